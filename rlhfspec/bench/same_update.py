"""bench trl's check of the update itself: TRL's optimizer step on the samples rlhfspec's first
step trained on (replayed in place of TRL's own sampling, trl_grpo.replay_step) set beside
rlhfspec's step on them, so that the reward curves' differences can be told apart from the two
trainers' semantics."""

from __future__ import annotations

import torch

from rlhfspec.rl.learner import Learner


class KeptRollout:
    """A rollout that keeps the prompts and outputs of its last run."""

    def __init__(self, rollout):
        self.rollout, self.prompts, self.outputs = rollout, None, None

    def run(self, prompts, *args, **kwargs):
        result = self.rollout.run(prompts, *args, **kwargs)
        self.prompts, self.outputs = [list(p) for p in prompts], result.outputs
        return result

    def __getattr__(self, name):
        return getattr(self.rollout, name)


def first_step(trainer, record: dict) -> dict:
    """What the check needs of a Trainer's just-finished first iteration (its rollout a KeptRollout):
    the samples, the step's loss, gradient norm and rate, its clipped gradients and the updated
    weights (rlhfspec's names), or {"skipped": why} where TRL's step could not be the same one."""
    c, policy, kept = trainer.config, trainer.policy, trainer.rollout
    completions = [list(o.token_ids) for o in kept.outputs]
    why = None
    if not isinstance(trainer.learner, Learner):
        why = "train.workers > 1 trains outside this process"
    elif c.train.dtype != "float32":
        why = (f"rlhfspec trains in {c.train.dtype} against the engine's logprobs (truncated importance weights or the engine's "
               "as the old ones), which TRL's replay has no counterpart of")
    elif not all(completions):
        why = "an empty completion, which the trainer trains as the end token and TRL cannot take"
    if why:
        return {"skipped": why}
    return {"prompt_ids": kept.prompts, "completions": completions, "loss": record["loss"], "grad_norm": record["grad_norm"],
            "lr": record["lr"], "model_config": policy.config,
            "gradients": {k: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for k, p in policy.named_parameters()},
            "weights": {k: v.detach().clone() for k, v in policy.state_dict().items()}}


def update_gap(ours: dict, theirs: dict) -> dict:
    """How far TRL's step on rlhfspec's samples lands from rlhfspec's own: `ours` as first_step
    keeps it, `theirs` as trl_grpo.replay_step returns it. Relative differences are
    ||ours - TRL's|| / ||TRL's|| over every parameter (0 where both are 0, inf where only TRL's
    is); the update figures are None where either step's rate was 0 (TRL's warm-up starts at 0,
    rlhfspec's at 1 / warmup_steps), and the largest single weight's difference is in learning rates."""
    from rlhfspec.models.checkpoint import from_hf

    cfg = ours["model_config"]
    grads = from_hf(cfg, theirs["gradients"], "TRL's gradients")
    before, after = from_hf(cfg, theirs["before"], "TRL's weights"), from_hf(cfg, theirs["after"], "TRL's updated weights")
    steps = {k: (ours["weights"][k] - before[k], after[k] - before[k]) for k in before}

    def relative(pairs) -> float:
        diff = sum(((a.double() - b.double()) ** 2).sum() for a, b in pairs) ** 0.5
        norm = sum((b.double() ** 2).sum() for _, b in pairs) ** 0.5
        return float(diff / norm) if norm > 0 else 0.0 if diff == 0 else float("inf")

    moved = ours["lr"] > 0 and theirs["lr"] > 0
    return {"samples": len(ours["completions"]), "tokens": sum(len(c) for c in ours["completions"]),
            "loss": {"rlhfspec": ours["loss"], "trl": theirs["loss"]},
            "grad_norm": {"rlhfspec": ours["grad_norm"], "trl": theirs["grad_norm"]},
            "lr": {"rlhfspec": ours["lr"], "trl": theirs["lr"]},
            "gradient_rel_diff": relative([(ours["gradients"][k], grads[k]) for k in grads]),
            "update_rel_diff": relative(steps.values()) if moved else None,
            "update_max_diff_lr": max((a - b).abs().max().item() for a, b in steps.values()) / ours["lr"] if moved else None}


def text(u: dict) -> str:
    """The check's clause for the report's 'Checked at run time' line."""
    if "skipped" in u:
        return f"the same update from the same samples: not checked ({u['skipped']})"
    loss, norm = u["loss"], u["grad_norm"]
    out = (f"the same update from the same samples (TRL's optimizer step on rlhfspec's {u['samples']} iteration-0 samples, "
           f"{u['tokens']} tokens, in place of its own): loss {loss['rlhfspec']:.6g} against TRL's {loss['trl']:.6g}, gradient norm "
           f"{norm['rlhfspec']:.6g} against {norm['trl']:.6g}, clipped gradients {u['gradient_rel_diff']:.1e} apart (relative)")
    if u["update_rel_diff"] is None:
        return out + f", weight updates not compared (learning rates {u['lr']['rlhfspec']:g} and {u['lr']['trl']:g} at the step)"
    return out + (f", weight updates {u['update_rel_diff']:.1e} apart (the largest single weight's: "
                  f"{u['update_max_diff_lr']:.2g} learning rates)")
