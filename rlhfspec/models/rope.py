"""Rotary position embeddings with the scaling types Llama-family configs use."""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhfspec.errors import RlhfspecError


def inv_freq_and_scale(rope: dict[str, Any], head_dim: int, max_len: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale, computed as transformers does.

    `max_len` is the longest sequence this table must serve; length-dependent schemes
    ("dynamic", "longrope") are only accepted where they reduce to a fixed table.
    """
    kind = rope.get("rope_type", "default")
    base = rope["rope_theta"]
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / rope["factor"], 1.0
    if kind == "dynamic":
        if max_len > max_position_embeddings:
            raise RlhfspecError(
                f"dynamic RoPE rescales past {max_position_embeddings} positions, which would make a sample's "
                f"numbers depend on its batch; lower max_len ({max_len}) to at most {max_position_embeddings}."
            )
        return inv, 1.0
    if kind == "llama3":
        return _llama3(inv, rope), 1.0
    if kind == "yarn":
        return _yarn(rope, head_dim, max_position_embeddings)
    raise RlhfspecError(f"rope_type {kind!r} is not supported; use default, linear, dynamic, llama3 or yarn.")


def _llama3(inv: torch.Tensor, rope: dict[str, Any]) -> torch.Tensor:
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: dict[str, Any], dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    base = rope["rope_theta"]
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention_factor)


def rope_tables(inv_freq: torch.Tensor, scale: float, max_len: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [max_len, D] and signed sin [max_len, D] so that rope(x) = x*cos + roll(x, D/2)*sin.

    The signed sin is (-sin, sin): roll(x, D/2) * (-sin, sin) equals transformers' rotate_half(x) * sin.
    """
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos = torch.cat((freqs, freqs), dim=-1).cos() * scale
    sin = freqs.sin() * scale
    signed_sin = torch.cat((-sin, sin), dim=-1)
    return cos.to(dtype=dtype, device=device), signed_sin.to(dtype=dtype, device=device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, H, D]; cos, sin: [N, 1, D] rows of `rope_tables` at each token's position."""
    # Two products and a sum, rounded as transformers rounds them (a fused addcmul drifts further).
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin
