"""The inference stage: rewards, old-policy and reference logprobs, values, advantages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.rl.advantages import gae, group_advantages, rloo_advantages, whiten
from rlhfspec.rl.config import AlgorithmConfig
from rlhfspec.rl.logprobs import Batch, all_logprobs, values_at
from rlhfspec.rl.losses import kl_estimate, kl_penalised_rewards, truncated_is_weights
from rlhfspec.rl.objective import Targets


def padded(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


@dataclass
class Inference:
    targets: Targets
    stats: dict


def make_targets(
    batch: Batch, rewards: torch.Tensor, group_size: int, rollout_logprobs: list[list[float]], algo: AlgorithmConfig,
    params: SamplingParams, policy, reuse_rollout_logprobs: bool, reference=None, critic=None, max_tokens: int = 4096,
) -> Inference:
    """Everything the training step needs, response-aligned.

    Old-policy logprobs are the engine's when it runs the trainer's weights in the trainer's
    precision (`reuse_rollout_logprobs`); otherwise the trainer recomputes them and, with
    algo.tis_cap, weights each token by min(pi_trainer / pi_engine, cap).
    """
    mask = batch.mask()
    width = mask.shape[1]
    rollout = padded(rollout_logprobs, width)
    stats: dict = {}
    if reuse_rollout_logprobs:
        old = rollout
        is_weights = None
    else:
        old = all_logprobs(policy, batch, params, max_tokens)
        stats["rollout_trainer_logprob_diff"] = ((old - rollout).abs() * mask).max().item()
        is_weights = truncated_is_weights(old, rollout, algo.tis_cap) * mask if algo.tis_cap else None
    ref = None
    if reference is not None:
        ref = all_logprobs(reference, batch, params, max_tokens)
        stats["kl"] = ((kl_estimate(old, ref, algo.kl_estimator) * mask).sum() / mask.sum()).item()
    targets = Targets(mask=mask, old_logprobs=old, advantages=torch.zeros(len(batch)), ref_logprobs=ref, is_weights=is_weights)
    r = rewards.float()
    if algo.name in ("grpo", "rloo"):
        grouped = r.view(-1, group_size)
        adv = group_advantages(grouped, algo.scale_rewards) if algo.name == "grpo" else rloo_advantages(grouped)
        targets.advantages = adv.reshape(-1)
        stats["groups_with_signal"] = (grouped.std(dim=1) > 0).float().mean().item()
    elif algo.name == "ppo":
        values = _values(critic, batch, width, max_tokens)
        beta = algo.beta if algo.kl_in_reward else 0.0
        per_token = kl_penalised_rewards(r, old, ref if ref is not None else old, mask, beta, algo.kl_estimator)
        adv, returns = gae(per_token, values, mask, algo.gamma, algo.lam)
        targets.advantages = whiten(adv, mask)
        targets.returns, targets.old_values = returns, values
        stats["value_mean"] = ((values * mask).sum() / mask.sum()).item()
    else:
        raise ValueError(f"algorithm must be grpo, rloo or ppo, not {algo.name!r}")
    return Inference(targets, stats)


@torch.no_grad()
def _values(critic, batch: Batch, width: int, max_tokens: int) -> torch.Tensor:
    model, head = critic
    out = torch.zeros(len(batch), width)
    for idx in batch.micro_batches(max_tokens):
        v = values_at(model, head, batch, idx)
        out[idx, : v.shape[1]] = v.cpu()
    return out
