"""Policy, value and KL losses as small pure functions over per-token tensors [B, T] with a 0/1 mask."""

from __future__ import annotations

import math

import torch


AGGREGATIONS = ("token-mean", "sequence-mean", "sequence-sum-mean")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    "token-mean": sum over every response token / number of tokens (DAPO, TRL's "dapo"/"bnpo");
    "sequence-mean": mean over each sequence's tokens, then over sequences (the original GRPO);
    "sequence-sum-mean": sum over every response token / (B * max_len), a constant (Dr. GRPO,
    TRL's "dr_grpo", with max_len the maximum completion length; default the mask's width).
    """
    w = token_weights(mask, how, mask.sum().item(), mask.shape[0], max_len or mask.shape[1])
    return (per_token * w.to(per_token.dtype)).sum()


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_low: float = 0.2, clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = exp(logp - logp_old),
    and where the clipped branch was taken. advantages: [B, T] or [B] (broadcast over the sequence)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    ratio = torch.exp(logprobs - old_logprobs)
    high = clip_low if clip_high is None else clip_high
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3).

    with log r = logp_ref - logp: k1 = -log r; k2 = (log r)^2 / 2; k3 = r - 1 - log r (unbiased, >= 0).
    """
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"kl estimator must be k1, k2 or k3, not {kind!r}")


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None = 0.2) -> torch.Tensor:
    """0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), token-mean over the mask."""
    loss = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return aggregate(0.5 * loss, mask, "token-mean")


def truncated_is_weights(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float = 2.0,
                         mask: torch.Tensor | None = None, level: str = "token") -> torch.Tensor:
    """Importance weights that correct for sampling with the engine's numbers (another precision)
    while training with the trainer's, truncated at `cap` to bound the variance: [B, T].

    "token": min(pi_trainer(y_t) / pi_rollout(y_t), cap) per token (verl's and Yao et al.'s TIS);
    "sequence": min(prod_t pi_trainer(y_t) / pi_rollout(y_t), cap) over the masked tokens, given to
    every token of the sequence (unbiased for sequence-level rewards until truncated).
    """
    log_ratio = trainer_logprobs - rollout_logprobs
    if mask is not None:
        log_ratio = log_ratio * mask
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(trainer_logprobs)
    elif level != "token":
        raise ValueError(f"importance weights are per token or per sequence, not {level!r}")
    w = torch.exp(log_ratio.clamp(max=math.log(cap)))
    return w * mask if mask is not None else w


def kl_penalised_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float, kind: str = "k1") -> torch.Tensor:
    """PPO's per-token rewards: -beta * KL_t at every response token, plus the sequence score at its last token.

    scores: [B]; logprobs, ref_logprobs, mask: [B, T] -> [B, T].
    """
    m = mask.to(logprobs.dtype)
    rewards = -beta * kl_estimate(logprobs, ref_logprobs, kind) * m
    last = (m.cumsum(-1) == m.sum(-1, keepdim=True)) & (m > 0)
    return rewards + last.to(rewards.dtype) * scores[:, None]


def token_weights(mask: torch.Tensor, how: str, total_tokens: float, total_sequences: float, max_len: int) -> torch.Tensor:
    """Per-token weights w with sum(w * loss) equal to aggregate(loss, mask, how, max_len) over a
    whole mini-batch, for one micro-batch of it (gradient accumulation keeps the mini-batch's
    normalisation)."""
    m = mask.to(torch.float32)
    if how == "token-mean":
        return m / max(total_tokens, 1.0)
    if how == "sequence-mean":
        return m / m.sum(-1, keepdim=True).clamp(min=1) / max(total_sequences, 1.0)
    if how == "sequence-sum-mean":
        return m / (max(total_sequences, 1.0) * max_len)
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, not {how!r}")
