"""`rlhfspec bench e2e --compare prompts`, `skip`, `checkpointing` and `logits`: one run whose every
iteration's samples are trained under both values of one trainer setting from the same state."""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rlhfspec.allocator import release_memory
from rlhfspec.bench.common import PeakMemory, bench_command, machine, median, results_file, write_json, write_section
from rlhfspec.bench.e2e import markdown_head
from rlhfspec.rl.config_files import load_config
from rlhfspec.rl.logprobs import Batch

# `--compare prompts|skip|checkpointing|logits`: two values of one train.* field, the reference first
# and the value the run goes on with second.
TRAINER_SETTINGS = {
    "prompts": {"field": "share_prompts", "section": "e2e-prompts", "values": {"a row per sample": False, "prompts shared": True},
                "title": "the trainer repeating each prompt per sample vs computing it once per group"},
    "skip": {"field": "skip_zero_advantage", "section": "e2e-skip", "values": {"every sample": False, "zero-advantage skipped": True},
             "title": "the trainer running every sample vs none for samples with zero advantage"},
    "checkpointing": {"field": "gradient_checkpointing", "section": "e2e-checkpointing",
                      "values": {"activations kept": False, "layers recomputed": True},
                      "title": "the trainer keeping every activation vs recomputing each layer in the backward pass"},
    "logits": {"field": "logits_chunk", "section": "e2e-logits", "values": {"logits at once": None, "logits in pieces of 256": 256},
               "title": "the trainer's output layer over all rows at once vs in pieces recomputed in the backward pass"},
}
SHARING = TRAINER_SETTINGS["prompts"]["values"]


class _Replay:
    """Stands in for a learner's `optimize`: each iteration's experience is trained once under each
    value of one trainer setting, every time from the same weights and optimizer state (the
    settings' order alternating by iteration), and the run goes on from the last value's update.
    Each run's seconds, forward tokens and skipped samples, and the largest difference between the
    settings' updated weights, are kept per iteration."""

    def __init__(self, learner, field: str, values: dict):
        self.learner, self.field, self.values = learner, field, values
        self.optimize, self.records = learner.optimize, []
        self.can_skip = learner.skips_flat  # under the second value, which run_trainer_setting configures

    def _snapshot(self) -> tuple[dict, dict]:
        tensors, objects = self.learner.state_dict()
        return {m: {k: t.detach().clone() for k, t in state.items()} for m, state in tensors.items()}, copy.deepcopy(objects)

    def _apply(self, batch, value):
        """The learner set to `value` and the batch it trains on."""
        if self.field == "share_prompts":
            return Batch(batch.prompts, batch.completions, value)
        if self.field == "skip_zero_advantage":
            self.learner.skips_flat = value and self.can_skip
        else:  # the learner reads it from its config at every step
            setattr(self.learner.config.train, self.field, value)
        return batch

    def __call__(self, batch, targets, iteration: int) -> dict:
        labels = list(self.values)
        before, row, weights = self._snapshot(), {}, {}
        last = labels[-1]  # the run goes on from this value's update
        for k, label in enumerate(labels if iteration % 2 else labels[::-1]):  # the second value first at even iterations
            if k:
                self.learner.load_state_dict(*before)
            release_memory()
            work = self._apply(batch, self.values[label])
            with PeakMemory(self.learner.policy.device) as memory:
                start = time.perf_counter()
                stats = self.optimize(work, targets, iteration)
                seconds = time.perf_counter() - start
            self.memory = memory.how
            row[label] = {"training_s": seconds, "peak_mb": memory.mb, "train_tokens": stats["train_tokens"],
                          "skipped_samples": stats.get("skipped_samples", 0), "loss": stats["loss"], "grad_norm": stats["grad_norm"]}
            weights[label] = [p.detach().clone() for p in self.learner.policy.parameters()]
            if label == last:
                kept = stats
                if k == 0:  # the reference runs next: the run goes back to this update after it
                    after = self._snapshot()
        if label != last:
            self.learner.load_state_dict(*after)
            self._apply(batch, self.values[last])  # and its setting, as the run goes on with it
        first, second = (weights[label] for label in labels)
        row["weight_diff_max"] = max((a - b).abs().max().item() for a, b in zip(first, second))
        self.records.append(row)
        return kept


def run_trainer_setting(compare: str, config_path: str | None, iterations: int, overrides: list[str] | None,
                        json_path: str | None, record: bool, log) -> dict:
    """One run of `iterations` iterations whose every experience is trained under both values of a
    trainer setting (TRAINER_SETTINGS[compare]: one train.* field)
    from the same state (`_Replay`), so both train on exactly the same samples: a setting that
    changes float32 rounding would otherwise part the two runs' samples after an update or two.
    Medians and sums over iterations 1.. of each setting's training seconds and forward tokens."""
    from rlhfspec.rl.trainer import Trainer

    spec = TRAINER_SETTINGS[compare]
    base = load_config(config_path, overrides or [])
    with tempfile.TemporaryDirectory(prefix="rlhfspec-bench-") as tmp:
        own = list(spec["values"].values())[-1]  # the run goes on from the second setting's updates
        cfg = replace(base, train=replace(base.train, iterations=iterations, **{spec["field"]: own}),
                      run=replace(base.run, output_dir=str(Path(tmp) / "run"), tensorboard=False, wandb=False, checkpoint_every=iterations))
        trainer = Trainer(cfg, progress=False, log=lambda m: None)
        replay = trainer.learner.optimize = _Replay(trainer.learner, spec["field"], spec["values"])
        runs = []
        for it in range(iterations):
            r = trainer.step()
            trainer.iteration += 1
            row = replay.records[-1]
            runs.append({"iteration": it, "generation_s": round(r["generation_s"], 2), "gen_tokens": r["gen_tokens"],
                         "reward": round(r["reward"], 4), "weight_diff_max": row["weight_diff_max"],
                         **{label: {k: v if k in ("loss", "grad_norm") else round(v, 2) for k, v in row[label].items()} for label in spec["values"]}})
            log(f"iteration {it}: {r['gen_tokens']} tokens, reward {r['reward']:.3f}; " + "; ".join(
                f"{label} {row[label]['training_s']:.1f} s over {row[label]['train_tokens']:.0f} tokens" for label in spec["values"]) +
                f"; weights differ by {row['weight_diff_max']:.1e}")
        del trainer
    later = runs[1:] or runs
    stats = {label: {"training_s": median([x[label]["training_s"] for x in later]), "training_s_sum": sum(x[label]["training_s"] for x in later),
                     "peak_mb": median([x[label]["peak_mb"] for x in later]),
                     "train_tokens": median([x[label]["train_tokens"] for x in later]),
                     "train_tokens_sum": sum(x[label]["train_tokens"] for x in later),
                     "skipped_samples": sum(x[label]["skipped_samples"] for x in later)} for label in spec["values"]}
    ref = stats[next(iter(spec["values"]))]
    result = {
        "machine": machine(), "iterations": iterations, "settings": {k: {f"train.{spec['field']}": v} for k, v in spec["values"].items()},
        "peak_memory": replay.memory,
        "generation_s_sum": round(sum(x["generation_s"] for x in later), 2), "weight_diff_max": max(x["weight_diff_max"] for x in runs),
        "training": {k: {s: round(x, 2) for s, x in m.items()} for k, m in stats.items()},
        "relative_to_reference": {k: {s: round(m[s] / ref[s], 3) if ref[s] else None for s in ("training_s", "training_s_sum", "train_tokens_sum", "peak_mb")}
                                  for k, m in stats.items()},
        "runs": runs,
    }
    write_json(json_path, result)
    cmd = bench_command(f"e2e --compare {compare}", config_path, iterations, overrides, json_path, record)
    log(write_section(spec["section"], _trainer_setting_markdown(result, cmd, iterations, spec), path=results_file(record)))
    return result


def _trainer_setting_markdown(r: dict, cmd: str, iterations: int, spec: dict) -> str:
    reference, own = spec["values"]
    lines = markdown_head(
        f"End to end: {spec['title']}", cmd, r["machine"],
        f"One run (train.{spec['field']} = {spec['values'][own]}); each iteration's experience trained under both settings from the "
        f"same weights and optimizer state, in alternating order, so both rows train on exactly the same samples. Medians and "
        f"sums over iterations 1..{iterations - 1} (iteration 0 pays warm-ups); forward tokens = the tokens the training forwards "
        f"run (padding included); skipped = samples with zero advantage that got no forward; x = the row's figure over "
        f"{reference}'s; peak memory = the most the training stage held above what the process held before it ({r['peak_memory']}). "
        f"The generation stage took {r['generation_s_sum']} s over those iterations (run once, for both); "
        f"the two settings' updated weights differed by at most {r['weight_diff_max']:.1e}.",
        ["setting", "training s (median)", "training s (sum)", "forward tokens (median)", "forward tokens (sum)", "skipped (sum)",
         "peak memory MB (median)", "training x (median)", "training x (sum)", "memory x"])
    for label, m in r["training"].items():
        x = r["relative_to_reference"][label]
        lines.append(f"| {label} | {m['training_s']} | {m['training_s_sum']:.1f} | {m['train_tokens']:.0f} | {m['train_tokens_sum']:.0f} | "
                     f"{m['skipped_samples']:.0f} | {m['peak_mb']:.0f} | {x['training_s']:.2f} | {x['training_s_sum']:.2f} | "
                     f"{'-' if x['peak_mb'] is None else format(x['peak_mb'], '.2f')} |")
    lines += ["", "| iteration | tokens generated | reward | " + " | ".join(f"{label} s / tokens / skipped" for label in spec["values"]) + " |",
              "|---:|---:|---:|" + "---:|" * len(spec["values"])]
    for x in r["runs"]:
        lines.append(f"| {x['iteration']} | {x['gen_tokens']} | {x['reward']:.3f} | " + " | ".join(
            f"{x[label]['training_s']:.1f} / {x[label]['train_tokens']:.0f} / {x[label]['skipped_samples']}" for label in spec["values"]) + " |")
    return "\n".join(lines)
