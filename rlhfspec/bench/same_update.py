"""bench trl's check of the update itself: TRL's optimizer steps on the samples rlhfspec's first
steps trained on (replayed in place of TRL's own sampling, trl_grpo.replay) set beside
rlhfspec's steps on them, so that the reward curves' differences can be told apart from the two
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
    weights (rlhfspec's names), with `steps` listing every kept step's samples and figures (next_step
    adds the later ones), or {"skipped": why} where TRL's step could not be the same one."""
    c, policy = trainer.config, trainer.policy
    step = _step(trainer, record)
    why = None
    if not isinstance(trainer.learner, Learner):
        why = "train.workers > 1 trains outside this process"
    elif c.train.dtype != "float32":
        why = (f"rlhfspec trains in {c.train.dtype} against the engine's logprobs (truncated importance weights or the engine's "
               "as the old ones), which TRL's replay has no counterpart of")
    elif not all(step["completions"]):
        why = "an empty completion, which the trainer trains as the end token and TRL cannot take"
    if why:
        return {"skipped": why}
    weights = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    return {**step, "model_config": policy.config, "steps": [step], "last": weights, "weights": weights,
            "gradients": {k: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for k, p in policy.named_parameters()}}


def next_step(kept: dict, trainer, record: dict) -> None:
    """Adds the Trainer's just-finished later iteration to `kept` (first_step's result): its samples
    and figures, and the weights after it as the last; a step TRL cannot take (an empty completion)
    ends the kept steps there, and `stopped` says why."""
    if "skipped" in kept or "stopped" in kept:
        return
    step = _step(trainer, record)
    if not all(step["completions"]):
        kept["stopped"] = f"iteration {record['iteration']} has an empty completion, which TRL cannot take"
        return
    kept["steps"].append(step)
    kept["last"] = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}


def _step(trainer, record: dict) -> dict:
    rollout = trainer.rollout
    return {"prompt_ids": rollout.prompts, "completions": [list(o.token_ids) for o in rollout.outputs],
            "loss": record["loss"], "grad_norm": record["grad_norm"], "lr": record["lr"]}


def update_gap(ours: dict, theirs: dict) -> dict:
    """How far TRL's steps on rlhfspec's samples land from rlhfspec's own: `ours` as first_step and
    next_step keep them, `theirs` as trl_grpo.replay returns it. Relative differences are
    ||ours - TRL's|| / ||TRL's|| over every parameter (0 where both are 0, inf where only TRL's
    is); the update figures are None where either first step's rate was 0 (TRL's warm-up starts at
    0, rlhfspec's at 1 / warmup_steps), and the largest single weight's difference is in learning
    rates. Over several steps, `last_update_rel_diff` compares the weights after the last one (both
    sides' whole update since the start)."""
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
    out = {"samples": len(ours["completions"]), "tokens": sum(len(c) for c in ours["completions"]),
           "loss": {"rlhfspec": ours["loss"], "trl": theirs["loss"]},
           "grad_norm": {"rlhfspec": ours["grad_norm"], "trl": theirs["grad_norm"]},
           "lr": {"rlhfspec": ours["lr"], "trl": theirs["lr"]},
           "gradient_rel_diff": relative([(ours["gradients"][k], grads[k]) for k in grads]),
           "update_rel_diff": relative(steps.values()) if moved else None,
           "update_max_diff_lr": max((a - b).abs().max().item() for a, b in steps.values()) / ours["lr"] if moved else None}
    if len(ours["steps"]) > 1:
        last = from_hf(cfg, theirs["last"], "TRL's last weights")
        out |= {"replayed_steps": [{"loss": {"rlhfspec": a["loss"], "trl": b["loss"]}, "grad_norm": {"rlhfspec": a["grad_norm"], "trl": b["grad_norm"]}}
                                   for a, b in zip(ours["steps"], theirs["steps"])],
                "last_update_rel_diff": relative([(ours["last"][k] - before[k], last[k] - before[k]) for k in before])}
    if "stopped" in ours:
        out["stopped"] = ours["stopped"]
    return out


def text(u: dict) -> str:
    """The check's clause for the report's 'Checked at run time' line."""
    if "skipped" in u:
        return f"the same update from the same samples: not checked ({u['skipped']})"
    loss, norm = u["loss"], u["grad_norm"]
    out = (f"the same update from the same samples (TRL's optimizer step on rlhfspec's {u['samples']} iteration-0 samples, "
           f"{u['tokens']} tokens, in place of its own): loss {loss['rlhfspec']:.6g} against TRL's {loss['trl']:.6g}, gradient norm "
           f"{norm['rlhfspec']:.6g} against {norm['trl']:.6g}, clipped gradients {u['gradient_rel_diff']:.1e} apart (relative)")
    if u["update_rel_diff"] is None:
        out += f", weight updates not compared (learning rates {u['lr']['rlhfspec']:g} and {u['lr']['trl']:g} at the step)"
    else:
        out += (f", weight updates {u['update_rel_diff']:.1e} apart (the largest single weight's: "
                f"{u['update_max_diff_lr']:.2g} learning rates)")
    if "replayed_steps" in u:
        steps = u["replayed_steps"]
        out += (f"; over rlhfspec's first {len(steps)} iterations' samples, one TRL step each (AdamW's state and the clipping "
                f"carried), the weights after the last {u['last_update_rel_diff']:.1e} apart relative to the whole update, losses "
                + ", ".join(f"{s['loss']['rlhfspec']:.6g}/{s['loss']['trl']:.6g}" for s in steps) + " (rlhfspec/TRL)")
    if "stopped" in u:
        out += f" (replay stopped there: {u['stopped']})"
    return out
