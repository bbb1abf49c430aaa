"""Stochastic rounding of float32 weights to bfloat16: each value one of its two bf16 neighbours,
unbiased on average where round-to-nearest is not, the same bits for the same key."""

import pytest
import torch

from rlhfspec.errors import RlhfspecError
from rlhfspec.models.rounding import engine_copy


def _neighbours(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above each float32 value (truncation and one step up)."""
    down = (w.view(torch.int32) & -(1 << 16)).view(torch.float32)
    up = ((w.view(torch.int32) & -(1 << 16)) + (1 << 16)).view(torch.float32)
    return torch.minimum(down, up), torch.maximum(down, up)


def test_stochastic_rounding_is_unbiased_where_nearest_keeps_a_small_step_at_its_old_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g)
    start = (torch.sign(x) * (0.05 + 0.1 * x.abs())).to(torch.bfloat16).float()  # on the bf16 grid, |w| >= 0.05
    w = start + 3e-5 * torch.sign(torch.randn(4000, generator=g))  # one Adam step at lr 3e-5: under half a bf16 step
    assert torch.equal(w.to(torch.bfloat16).float(), start)  # round-to-nearest loses the step entirely
    draws = torch.stack([engine_copy("w", w, torch.bfloat16, "stochastic", (0, k)).float() for k in range(400)])
    lo, hi = _neighbours(w)
    assert torch.all((draws == lo) | (draws == hi))
    direction = torch.sign(w - start)
    moved = ((draws.mean(0) - start) * direction).mean()
    assert moved.item() == pytest.approx(3e-5, rel=0.05)  # the step survives on average
    assert (draws.mean(0) - w).abs().max() < 0.2 * (hi - lo).max()


def test_the_same_key_and_name_give_the_same_bits_and_others_do_not():
    w = torch.randn(10_000) * 0.1
    a = engine_copy("layers.0.q.weight", w, torch.bfloat16, "stochastic", (3, 7))
    assert torch.equal(a, engine_copy("layers.0.q.weight", w, torch.bfloat16, "stochastic", (3, 7)))
    assert not torch.equal(a, engine_copy("layers.0.k.weight", w, torch.bfloat16, "stochastic", (3, 7)))
    assert not torch.equal(a, engine_copy("layers.0.q.weight", w, torch.bfloat16, "stochastic", (3, 8)))


def test_nearest_or_a_float32_engine_is_a_plain_cast_and_an_unknown_rounding_is_one_sentence():
    w = torch.randn(100)
    assert torch.equal(engine_copy("w", w, torch.bfloat16, "nearest", (0,)), w.to(torch.bfloat16))
    assert torch.equal(engine_copy("w", w, torch.float32, "stochastic", (0,)), w)
    with pytest.raises(RlhfspecError, match="generation.rounding 'up' is not one of nearest, stochastic."):
        engine_copy("w", w, torch.bfloat16, "up", (0,))
