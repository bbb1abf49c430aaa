"""The inference stage: rewards, old-policy and reference logprobs, values, advantages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.errors import RlhfspecError
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
    rollout_comparable: bool = True, trainer_logprobs: torch.Tensor | None = None, in_training: bool = False,
) -> Inference:
    """Everything the training step needs, response-aligned.

    `params` is the distribution the trainer scores tokens under: the sampling temperature only
    (top-k / top-p filter what the engine samples from, not what is trained, as in TRL and verl;
    so no sampled token can have logprob -inf). Old-policy logprobs are the engine's when they
    are that very distribution in the trainer's numbers (`reuse_rollout_logprobs`); otherwise
    the trainer recomputes them and, with algo.tis_cap and `rollout_comparable` (the engine
    sampled from that same distribution, unfiltered), weights the rollout by truncated importance
    sampling (losses.truncated_is_weights, per token or per sequence by algo.tis_level). KL (when beta > 0) goes where algo.kl_in_reward
    puts it: PPO's per-token rewards, GRPO's and RLOO's sequence rewards before the group
    baseline (TRL's RLOO), or the loss (objective.policy_objective). `trainer_logprobs`: the
    trainer's logprobs of this batch when already computed (the rollout/trainer check), not recomputed.
    `in_training` (one optimizer step per iteration, no reference model): the training forward
    measures the rollout/trainer gap and, unless the engine's logprobs are reused, takes its own
    detached logprobs as the old ones (and the importance weights from them): no forward here.
    """
    mask = batch.mask()
    width = mask.shape[1]
    rollout = padded(rollout_logprobs, width)
    stats: dict = {}
    if in_training:
        if reference is not None:
            raise ValueError("the old logprobs can come from the training forward only without a reference model")
        tis = (algo.tis_cap, algo.tis_level) if algo.tis_cap and rollout_comparable and not reuse_rollout_logprobs else None
        targets = Targets(mask=mask, old_logprobs=rollout if reuse_rollout_logprobs else None, advantages=torch.zeros(len(batch)),
                          rollout_logprobs=rollout, tis=tis)
        return _advantages(targets, batch, rewards, group_size, algo, critic, rollout, None, width, max_tokens, stats)
    if reuse_rollout_logprobs:
        old = rollout
        is_weights = None
    else:
        old = trainer_logprobs if trainer_logprobs is not None else all_logprobs(policy, batch, params, max_tokens)
        stats["rollout_trainer_logprob_diff"] = ((old - rollout).abs() * mask).max().item()
        is_weights = truncated_is_weights(old, rollout, algo.tis_cap, mask, algo.tis_level) if algo.tis_cap and rollout_comparable else None
    ref = None
    if reference is not None:
        ref = all_logprobs(reference, batch, params, max_tokens)
        stats["kl"] = ((kl_estimate(old, ref, algo.kl_estimator) * mask).sum() / mask.sum()).item()
    _check_finite(old, mask, "the old-policy logprobs")
    if ref is not None:
        _check_finite(ref, mask, "the reference model's logprobs")
    targets = Targets(mask=mask, old_logprobs=old, advantages=torch.zeros(len(batch)), ref_logprobs=ref, is_weights=is_weights)
    return _advantages(targets, batch, rewards, group_size, algo, critic, old, ref, width, max_tokens, stats)


def _advantages(targets: Targets, batch: Batch, rewards: torch.Tensor, group_size: int, algo: AlgorithmConfig, critic,
                old: torch.Tensor, ref: torch.Tensor | None, width: int, max_tokens: int, stats: dict) -> Inference:
    """make_targets' rewards to advantages (and PPO's values and returns); `old` is read only with a
    KL term in the rewards."""
    mask = targets.mask
    r = rewards.float()
    beta = algo.beta if algo.kl_in_reward and ref is not None else 0.0
    if algo.name in ("grpo", "rloo"):
        if beta:
            r = r - beta * (kl_estimate(old, ref, algo.kl_estimator) * mask).sum(-1)
        grouped = r.view(-1, group_size)
        adv = group_advantages(grouped, algo.scale_rewards) if algo.name == "grpo" else rloo_advantages(grouped)
        targets.advantages = adv.reshape(-1)
        stats["groups_with_signal"] = (grouped.std(dim=1) > 0).float().mean().item()
    elif algo.name == "ppo":
        values = _values(critic, batch, width, max_tokens)
        per_token = kl_penalised_rewards(r, old, ref if ref is not None else old, mask, beta, algo.kl_estimator)
        adv, returns = gae(per_token, values, mask, algo.gamma, algo.lam)
        targets.advantages = whiten(adv, mask)
        targets.returns, targets.old_values = returns, values
        stats["value_mean"] = ((values * mask).sum() / mask.sum()).item()
    else:
        raise ValueError(f"algorithm must be grpo, rloo or ppo, not {algo.name!r}")
    return Inference(targets, stats)


def _check_finite(logprobs: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(logprobs) & mask.bool()
    if bad.any():
        i, t = (int(v) for v in bad.nonzero()[0])
        raise RlhfspecError(f"{what} of sample {i}, token {t} is {logprobs[i, t].item()}; nothing non-finite may reach the loss "
                            "(the trainer scores tokens under the temperature alone, so this points at the model's weights).")


@torch.no_grad()
def _values(critic, batch: Batch, width: int, max_tokens: int) -> torch.Tensor:
    model, head = critic
    out = torch.zeros(len(batch), width)
    for idx in batch.micro_batches(max_tokens):
        v = values_at(model, head, batch, idx)
        out[idx, : v.shape[1]] = v.cpu()
    return out
