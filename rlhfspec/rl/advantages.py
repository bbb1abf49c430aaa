"""Advantage estimators as small pure functions over tensors."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean(group)) / (std(group) + eps); rewards: [groups, G] -> [groups, G].

    scale: "group" divides by each group's std, "batch" by the std of all rewards, "none" only
    centres (Dr. GRPO). std is the unbiased sample std, as in TRL. Invariant: advantages within a
    group sum to zero.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centred / (rewards.std() + eps)
    if scale == "none":
        return centred
    raise ValueError(f"scale must be 'group', 'batch' or 'none', not {scale!r}")


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean(group)); rewards: [groups, G], G >= 2."""
    g = rewards.shape[1]
    return (rewards - rewards.mean(dim=1, keepdim=True)) * g / (g - 1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: rewards, values, mask: [B, T].

    delta_t = r_t + gamma V_{t+1} - V_t (V past a sequence's last token is 0);
    A_t = delta_t + gamma lam A_{t+1}; returns R_t = A_t + V_t. Masked positions get 0.
    """
    b, t = rewards.shape
    mask = mask.to(rewards.dtype)
    values = values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for i in reversed(range(t)):
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        running = (delta + gamma * lam * running) * mask[:, i]
        adv[:, i] = running
        next_value = values[:, i]
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (the PPO advantage normalisation)."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * m
