"""Casting the trainer's float32 weights to a lower-precision engine copy."""

from __future__ import annotations

import zlib

import torch

from rlhfspec.errors import RlhfspecError

ROUNDINGS = ("nearest", "stochastic")


def stochastic_bf16(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 w rounded to one of its two bfloat16 neighbours at random, to the one farther from
    zero with probability (distance from the nearer-to-zero one) / (their gap), so E[result] = w
    exactly. Round-to-nearest instead keeps a weight where it was until it has moved half a bf16
    step (about 2.4e-4 at |w| = 0.1, eight Adam steps at lr 3e-5), so a bf16 engine lags the
    trained policy. Adding 16 random low bits and truncating them is that rule."""
    bits = w.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, dtype=torch.int32, device=bits.device)
    return ((bits + noise) & -(1 << 16)).view(torch.float32).to(torch.bfloat16)


def engine_copy(name: str, w: torch.Tensor, dtype: torch.dtype, rounding: str, key: tuple[int, ...]) -> torch.Tensor:
    """Parameter `name` of the trainer cast to the engine's dtype. Stochastic rounding (float32 to
    bfloat16 only) draws from a generator keyed by `key` and the name alone, so every engine copy,
    in this process or on a Ray actor, and a resumed run get the same bits."""
    if rounding not in ROUNDINGS:
        raise RlhfspecError(f"generation.rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}.")
    if rounding == "nearest" or dtype != torch.bfloat16 or w.dtype != torch.float32:
        return w.detach().to(dtype)
    seed = zlib.crc32(repr((*key, name)).encode())
    return stochastic_bf16(w, torch.Generator(device=w.device).manual_seed(seed))
