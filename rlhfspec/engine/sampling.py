"""Sampling parameters, the processed distribution, and counter-based (placement-independent) randomness."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfspec.errors import RlhfspecError
from rlhfspec.models.invariance import rowwise

# What a keyed uniform is drawn for; part of the key so the draws never collide.
SAMPLE, ACCEPT, RESIDUAL = 0, 1, 2


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How tokens are drawn. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise RlhfspecError(f"temperature is {self.temperature}; it must be >= 0 (0 is greedy).")
        if not 0 < self.top_p <= 1:
            raise RlhfspecError(f"top_p is {self.top_p}; it must be in (0, 1].")
        if self.top_k < 0:
            raise RlhfspecError(f"top_k is {self.top_k}; it must be >= 0 (0 disables it).")
        if self.max_new_tokens < 1:
            raise RlhfspecError(f"max_new_tokens is {self.max_new_tokens}; it must be >= 1.")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def group_rows(params: list[SamplingParams]) -> dict[SamplingParams, list[int]]:
    """Row indices by sampling settings (each group is processed and sampled in one call)."""
    groups: dict[SamplingParams, list[int]] = {}
    for r, p in enumerate(params):
        groups.setdefault(p, []).append(r)
    return groups


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log of the distribution tokens are drawn from: logits [R, V] -> logprobs [R, V] (-inf where filtered).

    Order as in transformers' generate: temperature, then top-k, then top-p (keeping at least one token).
    At temperature 0 this is the unscaled model distribution (the token is its argmax).
    """
    x = logits.float()
    if params.temperature not in (0.0, 1.0):
        x = x / params.temperature
    if not params.greedy:
        if 0 < params.top_k < x.shape[-1]:
            kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_x, order = torch.sort(x, dim=-1)
            cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
            drop = cum <= 1 - params.top_p
            drop[..., -1] = False
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(x, dim=-1)


def sample(logprobs: torch.Tensor, uniforms: torch.Tensor, greedy: bool) -> torch.Tensor:
    """Draw one token per row by inverting the CDF at a given uniform: logprobs [R, V], uniforms [R] -> [R].

    uniforms lie in [0, 1 - 2^-48], so u * total < total and the first CDF entry above it
    always belongs to a token of positive probability.
    """
    if greedy:
        return logprobs.argmax(dim=-1)
    cdf = rowwise(torch.exp, logprobs).double().cumsum(dim=-1)
    target = (uniforms.double().clamp(max=1 - 2.0**-48) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logprobs.shape[-1] - 1)


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_C1, _C2, _GOLD = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(_GOLDEN)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 lanes holding uint64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 lanes (wrapping arithmetic)."""
    x = (x ^ _shr(x, 30)) * _C1
    x = (x ^ _shr(x, 27)) * _C2
    return x ^ _shr(x, 31)


def keyed_uniforms(seeds: int | torch.Tensor, sample_ids: torch.Tensor, positions: torch.Tensor, purpose: int) -> torch.Tensor:
    """One uniform in [0, 1) per (seed, sample_id, position, purpose): a pure function of the key.

    seeds (int or [R]), sample_ids, positions: [R] int64 -> float64 [R]. Never a shared stream,
    so a sample's draws do not depend on its batch, slot or instance.
    """
    if isinstance(seeds, int):
        seeds = torch.full_like(sample_ids, _signed(seeds & _MASK64))
    h = _mix(seeds + _GOLD)
    h = _mix(h ^ sample_ids)
    h = _mix(h ^ (positions + _GOLD))
    h = _mix(h ^ _signed((purpose * _GOLDEN) & _MASK64))
    return _shr(h, 16).double() * (2.0**-48)


def keyed_uniforms_reference(seed: int, sample_id: int, position: int, purpose: int) -> float:
    """The same function in plain Python integers (the test oracle for `keyed_uniforms`)."""

    def mix(x: int) -> int:
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return x ^ (x >> 31)

    h = mix((seed + _GOLDEN) & _MASK64)
    h = mix(h ^ (sample_id & _MASK64))
    h = mix(h ^ ((position + _GOLDEN) & _MASK64))
    h = mix(h ^ ((purpose * _GOLDEN) & _MASK64))
    return (h >> 16) * 2.0**-48


def seed_tensor(seeds: list[int], device) -> torch.Tensor:
    """Python seeds (any size) -> int64 lanes holding their low 64 bits."""
    return torch.tensor([_signed(s & _MASK64) for s in seeds], dtype=torch.long, device=device)
