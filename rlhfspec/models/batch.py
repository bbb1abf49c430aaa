"""Full-sequence forwards over padded batches (training, scoring), as opposed to the engine's cached ones."""

from __future__ import annotations

import torch

from rlhfspec.models.attention import DenseAttention


def padded_batch(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and 0/1 mask: [B, T] each."""
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


def hidden_states(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's final hidden states (before the last norm) [B, T, H]; grad follows the caller's mode."""
    b, t = ids.shape
    model.ensure_positions(t)
    att = DenseAttention(mask.to(model.device), model.config.num_heads, model.config.num_kv_heads)
    return model(ids.to(model.device).reshape(-1), att.positions, att).view(b, t, -1)
