"""The per-micro-batch training objective: clipped policy loss, KL term, value loss."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rlhfspec.rl.config import AlgorithmConfig
from rlhfspec.rl.losses import clipped_surrogate, clipped_value_loss, kl_estimate, token_weights, truncated_is_weights


@dataclass(slots=True)
class Targets:
    """Response-aligned [N, T] tensors for one iteration's samples."""

    mask: torch.Tensor
    # None: the training forward's own logprobs, detached (one optimizer step per iteration, so the
    # policy being trained is the behaviour policy's trainer-side twin: no separate forward).
    old_logprobs: torch.Tensor | None
    advantages: torch.Tensor  # [N] (GRPO, RLOO) or [N, T] (PPO)
    ref_logprobs: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None
    # The engine's logprobs: the training forward measures its gap to them; with `tis` (cap,
    # level) and no old_logprobs it also weights the tokens by losses.truncated_is_weights.
    rollout_logprobs: torch.Tensor | None = None
    tis: tuple[float, str] | None = None
    returns: torch.Tensor | None = None
    old_values: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Targets:
        """These targets with every tensor on `device` (a tensor already there is not copied)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Targets(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()})


def policy_objective(logprobs: torch.Tensor, idx: list[int], t: Targets, algo: AlgorithmConfig, n_tokens: float, n_seqs: float,
                     max_len: int, entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """This micro-batch's share of the mini-batch loss: the clipped surrogate (times truncated IS
    weights), + beta * KL when KL is in the loss, - entropy_coef * entropy; aggregated with the
    weights `token_weights` gives (so micro-batch shares add up to the mini-batch's aggregate).

    logprobs, entropy: [b, T'] for samples idx of the iteration; n_tokens, n_seqs: the mini-batch's
    response tokens and sequences; max_len: the maximum completion length (Dr. GRPO's constant).
    """
    width = logprobs.shape[1]
    mask = t.mask[idx, :width]
    own = logprobs.detach()
    old = t.old_logprobs[idx, :width] if t.old_logprobs is not None else own
    adv = t.advantages[idx] if t.advantages.dim() == 1 else t.advantages[idx, :width]
    per_token, was_clipped = clipped_surrogate(logprobs, old, adv, algo.clip_low, algo.clip_high)
    is_weights = t.is_weights[idx, :width] if t.is_weights is not None else None
    stats = {"clipped": (was_clipped.float() * mask).sum().item(), "tokens": mask.sum().item()}
    if t.rollout_logprobs is not None:
        rollout = t.rollout_logprobs[idx, :width]
        gap = (own - rollout).abs() * mask
        stats["gap_max"], stats["gap_sum"] = gap.max().item(), gap.sum().item()
        if t.tis is not None and t.old_logprobs is None:
            is_weights = truncated_is_weights(own, rollout, t.tis[0], mask, t.tis[1])
    if is_weights is not None:
        per_token = per_token * is_weights
    if algo.beta > 0 and not algo.kl_in_reward and t.ref_logprobs is not None:
        kl = kl_estimate(logprobs, t.ref_logprobs[idx, :width], algo.kl_estimator)
        per_token = per_token + algo.beta * kl
        stats["kl_sum"] = (kl.detach() * mask).sum().item()
    if entropy is not None:
        stats["entropy_sum"] = (entropy.detach() * mask).sum().item()
        if algo.entropy_coef:
            per_token = per_token - algo.entropy_coef * entropy
    w = token_weights(mask, algo.aggregation, n_tokens, n_seqs, max_len)
    return (per_token * w).sum(), stats


def value_objective(values: torch.Tensor, idx: list[int], t: Targets, algo: AlgorithmConfig, n_tokens: float) -> torch.Tensor:
    """This micro-batch's share of the clipped value loss (token-mean over the mini-batch)."""
    width = values.shape[1]
    mask = t.mask[idx, :width]
    loss = clipped_value_loss(values, t.old_values[idx, :width], t.returns[idx, :width], mask, algo.value_clip)
    return loss * mask.sum() / max(n_tokens, 1.0)
