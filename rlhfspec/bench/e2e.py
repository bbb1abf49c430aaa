"""`rlhfspec bench e2e`: the same RL iterations with every generation feature off vs on."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from rlhfspec.bench.common import bench_command, machine, median, results_file, write_json, write_section
from rlhfspec.models.hardware import release_memory
from rlhfspec.rl.config import load_config

STAGES = ("generation_s", "inference_s", "training_s", "sync_s", "iteration_s")
# `--compare precision`: label -> (train.dtype, generation.dtype, algorithm.old_logprobs)
PRECISIONS = {
    "float32": ("float32", "float32", "auto"),
    "bf16 train, float32 generation": ("bfloat16", "float32", "auto"),
    "bf16 train + generation": ("bfloat16", "bfloat16", "auto"),
    "bf16 train + generation, old = rollout": ("bfloat16", "bfloat16", "rollout"),
}

# `--compare placement`: label -> config overrides; generation K actors (K = 2) and N trainer processes.
RAY = ["--generation.backend", "ray", "--generation.instances", "2", "--generation.realloc", "true"]
PLACEMENTS = {
    "in-process, K=1": [],
    "in-process, K=2": ["--generation.instances", "2", "--generation.realloc", "true"],
    "Ray, K=2 actors, N=1": RAY,
    "Ray, K=2 actors, N=2 trainers": [*RAY, "--train.workers", "2"],
}


def run(config_path: str | None = None, iterations: int = 4, overrides: list[str] | None = None,
        json_path: str | None = None, record: bool = False, log=print, compare: str = "features") -> dict:
    """compare "features" (below), "precision" (`run_precision`), "placement" (`run_placement`),
    "prompts" or "skip" (`run_trainer_setting`)."""
    if compare == "precision":
        return run_precision(config_path, iterations, overrides, json_path, record, log)
    if compare == "placement":
        return run_placement(config_path, iterations, overrides, json_path, record, log)
    if compare in TRAINER_SETTINGS:
        return run_trainer_setting(compare, config_path, iterations, overrides, json_path, record, log)
    if compare != "features":
        raise ValueError(f"bench e2e compares features, precision, placement, prompts or skip, not {compare!r}")
    return run_features(config_path, iterations, overrides, json_path, record, log)


def run_features(config_path: str | None, iterations: int, overrides: list[str] | None, json_path: str | None,
                 record: bool, log) -> dict:
    """Trains `iterations` iterations twice from the same seed: vanilla (plain decoding, one
    instance) and full (the config's generation features: speculation, its strategy, its drafters).
    Stage times are medians over iterations 1.. (iteration 0 pays one-off warm-ups)."""
    base = load_config(config_path, overrides or [])
    if not base.generation.speculative:
        log("note: the config has speculation off, so 'full' differs from vanilla only in the other flags")
    settings = {
        "vanilla": replace(base.generation, speculative=False, instances=1, realloc=False),
        "full": base.generation,
    }
    medians, runs = {}, {}
    for label, gen in settings.items():
        records = train_records(base, gen, iterations)
        kept = records[1:] or records
        medians[label] = {k: median([r[k] for r in kept]) for k in STAGES}
        runs[label] = [{k: round(r[k], 2) for k in (*STAGES, "reward", "gen_tokens", "acceptance") if r.get(k) is not None}
                       for r in records]
        m = medians[label]
        log(f"{label:8} iteration {m['iteration_s']:.1f} s (generation {m['generation_s']:.1f}, training {m['training_s']:.1f}, "
            f"refresh/sync {m['sync_s']:.1f})")
    v, f = medians["vanilla"], medians["full"]
    share = v["generation_s"] / v["iteration_s"]
    result = {
        "machine": machine(), "iterations": iterations,
        "generation": {"speculative": base.generation.speculative, "strategy": base.generation.strategy, "drafters": base.generation.drafters,
                       "instances": base.generation.instances, "realloc": base.generation.realloc},
        "vanilla_iter_s": round(v["iteration_s"], 2), "full_iter_s": round(f["iteration_s"], 2),
        "speedup": round(v["iteration_s"] / f["iteration_s"], 3),
        "generation_share_vanilla": round(share, 3),
        "amdahl_bound_2x_generation": round(1 / (1 - share + share / 2), 3),
        "amdahl_bound_infinite_generation": round(1 / (1 - share), 3),
        "generation_speedup": round(v["generation_s"] / f["generation_s"], 3),
        "stages": {k: {s: round(x, 2) for s, x in m.items()} for k, m in medians.items()},
        "runs": runs,
    }
    write_json(json_path, result)
    log(f"speedup {result['speedup']:.2f}x per iteration (generation {result['generation_speedup']:.2f}x); generation is "
        f"{share:.0%} of a vanilla iteration, so even infinitely fast generation gives at most {result['amdahl_bound_infinite_generation']:.2f}x")
    # The table is printed always; it goes into benchmarks/RESULTS.md only with record.
    results = results_file(record)
    cmd = bench_command("e2e", config_path, iterations, overrides, json_path, record)
    log(write_section("e2e", _markdown(result, cmd, iterations), path=results))
    return result


def _markdown(r: dict, cmd: str, iterations: int) -> str:
    g = r["generation"]
    lines = markdown_head(
        "End to end: RL iterations with generation features off vs on", cmd, r["machine"],
        f"Same config and seed; vanilla = plain decoding on one instance; full = spec {g['spec']}, strategy {g['strategy']}, "
        f"drafters {g['drafters']}, instances {g['instances']}, realloc {g['realloc']}. Medians over iterations 1..{iterations - 1} "
        "(iteration 0 pays warm-ups).",
        ["setting", "generation s", "inference s", "training s", "refresh/sync s", "iteration s"])
    for label, m in r["stages"].items():
        lines.append(f"| {label} | {m['generation_s']} | {m['inference_s']} | {m['training_s']} | {m['sync_s']} | {m['iteration_s']} |")
    lines += [
        "",
        f"Iteration speedup **{r['speedup']:.2f}x** (target 1.5x); generation alone {r['generation_speedup']:.2f}x. "
        f"Generation is {r['generation_share_vanilla']:.0%} of a vanilla iteration: by Amdahl's law a 2x faster generation "
        f"stage bounds the iteration speedup at {r['amdahl_bound_2x_generation']:.2f}x, and infinitely fast generation at "
        f"{r['amdahl_bound_infinite_generation']:.2f}x.",
    ]
    return "\n".join(lines)


def train_records(base, generation, iterations: int) -> list[dict]:
    """The metrics of `iterations` iterations of `base` with this generation config, in a scratch run directory."""
    from rlhfspec.rl.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="rlhfspec-bench-") as tmp:
        cfg = replace(base, generation=generation, train=replace(base.train, iterations=iterations),
                      run=replace(base.run, output_dir=str(Path(tmp) / "run"), tensorboard=False, wandb=False,
                                  checkpoint_every=iterations))
        return Trainer(cfg, progress=False, log=lambda m: None).train()


def run_precision(config_path: str | None, iterations: int, overrides: list[str] | None, json_path: str | None,
                  record: bool, log) -> dict:
    """The same iterations from the same seed in each of PRECISIONS: the trainer in float32 or
    under bfloat16 autocast, the engine in float32 or bfloat16, old logprobs recomputed by the
    trainer (with truncated IS) or taken from the engine. The settings run round-robin, one
    iteration each in turn in one process, so that a shared machine's slow spells fall on all of
    them alike. Stage times are medians over iterations 1.. ; the gap between the engine's and the
    trainer's logprobs is iteration 0's check."""
    from rlhfspec.models.hardware import native_bf16

    base = load_config(config_path, overrides or [])
    configs = {label: replace(base, generation=replace(base.generation, dtype=gen_dtype),
                              train=replace(base.train, dtype=train_dtype), algorithm=replace(base.algorithm, old_logprobs=old))
               for label, (train_dtype, gen_dtype, old) in PRECISIONS.items()}
    all_records = round_robin(configs, iterations, log)
    medians, gaps = {}, {}
    for label, records in all_records.items():
        kept = records[1:] or records
        medians[label] = {**{k: median([r[k] for r in kept]) for k in STAGES}, "gen_tok_s": median([r["gen_tok_s"] for r in kept])}
        gaps[label] = {k.removeprefix("rollout_trainer_logprob_gap_"): round(records[0][k], 5)
                       for k in ("rollout_trainer_logprob_gap_max", "rollout_trainer_logprob_gap_mean") if k in records[0]}
    ref = medians["float32"]
    result = {
        "machine": machine(), "native_bf16": native_bf16(), "iterations": iterations,
        "settings": {k: {"train.dtype": t, "generation.dtype": g, "algorithm.old_logprobs": o} for k, (t, g, o) in PRECISIONS.items()},
        "stages": {k: {s: round(x, 2) for s, x in m.items()} for k, m in medians.items()},
        "relative_to_float32": {k: {s: round(m[s] / ref[s], 3) for s in ("generation_s", "training_s", "iteration_s")} for k, m in medians.items()},
        "logprob_gap": gaps, "runs": rounded_runs(all_records, (*STAGES, "reward", "gen_tokens", "gen_tok_s")),
    }
    write_json(json_path, result)
    cmd = bench_command("e2e --compare precision", config_path, iterations, overrides, json_path, record)
    log(write_section("e2e-precision", _precision_markdown(result, cmd, iterations), path=results_file(record)))
    return result


def rounded_runs(all_records: dict[str, list[dict]], keys: tuple) -> dict[str, list[dict]]:
    """Each row's per-iteration records, `keys` only (those present), rounded for the JSON."""
    return {label: [{k: round(r[k], 4 if k == "reward" else 2) for k in keys if r.get(k) is not None} for r in records]
            for label, records in all_records.items()}


def markdown_head(title: str, cmd: str, machine_line: str, text: str, columns: list[str]) -> list[str]:
    """A bench section's title, command, machine, how to read it, and its table's header."""
    return [f"## {title}", "", f"Command: `{cmd}`  ", f"Machine: {machine_line}  ", text, "",
            "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]


def round_robin(configs: dict, iterations: int, log) -> dict[str, list[dict]]:
    """Each config's first `iterations` iterations (scratch run directories), one iteration of each
    in turn in this process, so that a shared machine's slow spells fall on all of them alike."""
    from rlhfspec.rl.trainer import Trainer

    all_records: dict[str, list[dict]] = {label: [] for label in configs}
    with tempfile.TemporaryDirectory(prefix="rlhfspec-bench-") as tmp:
        trainers = {}
        for i, (label, cfg) in enumerate(configs.items()):
            cfg = replace(cfg, train=replace(cfg.train, iterations=iterations),
                          run=replace(cfg.run, output_dir=str(Path(tmp) / f"run{i}"), tensorboard=False, wandb=False))
            trainers[label] = Trainer(cfg, progress=False, log=lambda m: None)
        for it in range(iterations):
            for label, trainer in trainers.items():
                release_memory()  # what the last trainer's step freed, back to the OS before the next one's
                r = trainer.step()
                trainer.iteration += 1
                all_records[label].append(r)
                log(f"iteration {it} {label:40} {r['iteration_s']:.1f} s (generation {r['generation_s']:.1f}, inference "
                    f"{r['inference_s']:.1f}, training {r['training_s']:.1f}), {r['gen_tokens']} tokens, reward {r['reward']:.3f}")
        del trainers
    return all_records


# `--compare prompts` and `--compare skip`: two values of one train.* field, the reference first and
# the value the run goes on with second.
TRAINER_SETTINGS = {
    "prompts": {"field": "share_prompts", "section": "e2e-prompts", "values": {"a row per sample": False, "prompts shared": True},
                "title": "the trainer repeating each prompt per sample vs computing it once per group"},
    "skip": {"field": "skip_zero_advantage", "section": "e2e-skip", "values": {"every sample": False, "zero-advantage skipped": True},
             "title": "the trainer running every sample vs none for samples with zero advantage"},
}
SHARING = TRAINER_SETTINGS["prompts"]["values"]


class _Replay:
    """Stands in for a learner's `optimize`: each iteration's experience is trained once under each
    value of one trainer setting, every time from the same weights and optimizer state (the
    settings' order alternating by iteration), and the run goes on from the last value's update.
    Each run's seconds, forward tokens and skipped samples, and the largest difference between the
    settings' updated weights, are kept per iteration."""

    def __init__(self, learner, field: str, values: dict):
        from rlhfspec.rl.learner import skips_zero_advantage

        self.learner, self.field, self.values = learner, field, values
        self.optimize, self.records = learner.optimize, []
        self.can_skip = skips_zero_advantage(replace(learner.config, train=replace(learner.config.train, skip_zero_advantage=True)),
                                             critic=learner.critic is not None)

    def _snapshot(self) -> tuple[dict, dict]:
        import copy

        tensors, objects = self.learner.state_dict()
        return {m: {k: t.detach().clone() for k, t in state.items()} for m, state in tensors.items()}, copy.deepcopy(objects)

    def _apply(self, batch, value):
        """The learner set to `value` and the batch it trains on."""
        from rlhfspec.rl.logprobs import Batch

        if self.field == "share_prompts":
            return Batch(batch.prompts, batch.completions, value)
        self.learner.skips_flat = value and self.can_skip
        return batch

    def __call__(self, batch, targets, iteration: int) -> dict:
        import time

        labels = list(self.values)
        before, row, weights = self._snapshot(), {"iteration": iteration}, {}
        last = labels[-1]  # the run goes on from this value's update
        for k, label in enumerate(labels if iteration % 2 else labels[::-1]):  # the second value first at even iterations
            if k:
                self.learner.load_state_dict(*before)
            release_memory()
            start = time.perf_counter()
            stats = self.optimize(self._apply(batch, self.values[label]), targets, iteration)
            row[label] = {"training_s": time.perf_counter() - start, "train_tokens": stats["train_tokens"],
                          "skipped_samples": stats.get("skipped_samples", 0), "loss": stats["loss"], "grad_norm": stats["grad_norm"]}
            weights[label] = [p.detach().clone() for p in self.learner.policy.parameters()]
            if label == last:
                kept = stats
                if k == 0:  # the reference runs next: the run goes back to this update after it
                    after = self._snapshot()
        if label != last:
            self.learner.load_state_dict(*after)
        first, second = (weights[label] for label in labels)
        row["weight_diff_max"] = max((a - b).abs().max().item() for a, b in zip(first, second))
        self.records.append(row)
        return kept


def run_trainer_setting(compare: str, config_path: str | None, iterations: int, overrides: list[str] | None,
                        json_path: str | None, record: bool, log) -> dict:
    """One run of `iterations` iterations whose every experience is trained under both values of a
    trainer setting (TRAINER_SETTINGS[compare]: train.share_prompts or train.skip_zero_advantage)
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
                     "train_tokens": median([x[label]["train_tokens"] for x in later]),
                     "train_tokens_sum": sum(x[label]["train_tokens"] for x in later),
                     "skipped_samples": sum(x[label]["skipped_samples"] for x in later)} for label in spec["values"]}
    ref = stats[next(iter(spec["values"]))]
    result = {
        "machine": machine(), "iterations": iterations, "settings": {k: {f"train.{spec['field']}": v} for k, v in spec["values"].items()},
        "generation_s_sum": round(sum(x["generation_s"] for x in later), 2), "weight_diff_max": max(x["weight_diff_max"] for x in runs),
        "training": {k: {s: round(x, 2) for s, x in m.items()} for k, m in stats.items()},
        "relative_to_reference": {k: {s: round(m[s] / ref[s], 3) if ref[s] else None for s in ("training_s", "training_s_sum", "train_tokens_sum")}
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
        f"{reference}'s. The generation stage took {r['generation_s_sum']} s over those iterations (run once, for both); "
        f"the two settings' updated weights differed by at most {r['weight_diff_max']:.1e}.",
        ["setting", "training s (median)", "training s (sum)", "forward tokens (median)", "forward tokens (sum)", "skipped (sum)",
         "training x (median)", "training x (sum)"])
    for label, m in r["training"].items():
        x = r["relative_to_reference"][label]
        lines.append(f"| {label} | {m['training_s']} | {m['training_s_sum']:.1f} | {m['train_tokens']:.0f} | {m['train_tokens_sum']:.0f} | "
                     f"{m['skipped_samples']:.0f} | {x['training_s']:.2f} | {x['training_s_sum']:.2f} |")
    lines += ["", "| iteration | tokens generated | reward | " + " | ".join(f"{label} s / tokens / skipped" for label in spec["values"]) + " |",
              "|---:|---:|---:|" + "---:|" * len(spec["values"])]
    for x in r["runs"]:
        lines.append(f"| {x['iteration']} | {x['gen_tokens']} | {x['reward']:.3f} | " + " | ".join(
            f"{x[label]['training_s']:.1f} / {x[label]['train_tokens']:.0f} / {x[label]['skipped_samples']}" for label in spec["values"]) + " |")
    return "\n".join(lines)


PLACEMENT_STAGES = (*STAGES, "weight_sync_s", "allreduce_s", "allreduce_wait_s", "weights_back_s")


def run_placement(config_path: str | None, iterations: int, overrides: list[str] | None, json_path: str | None,
                  record: bool, log) -> dict:
    """The same iterations from the same seed with the generation instances and the trainer in
    this process or on Ray (PLACEMENTS). The rows run one after another (each row's trainers and
    actors together would not fit in memory beside another's); stage times are medians over
    iterations 1.. . Batch-invariant generation makes every row's rollouts the same samples."""
    from rlhfspec.rl.trainer import Trainer

    all_records: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="rlhfspec-bench-") as tmp:
        for i, (label, extra) in enumerate(PLACEMENTS.items()):
            cfg = load_config(config_path, [*(overrides or []), *extra, "--train.iterations", str(iterations),
                                            "--run.output_dir", str(Path(tmp) / f"run{i}"), "--run.tensorboard", "false",
                                            "--run.checkpoint_every", str(iterations)])
            release_memory()
            records = all_records[label] = []
            trainer = Trainer(cfg, progress=False, log=lambda m: None)
            try:
                for _ in range(iterations):
                    release_memory()
                    r = trainer.step()
                    trainer.iteration += 1
                    records.append(r)
                    log(f"{label:30} iteration {r['iteration']} {r['iteration_s']:.1f} s (generation {r['generation_s']:.1f}, "
                        f"inference {r['inference_s']:.1f}, training {r['training_s']:.1f}, sync {r['sync_s']:.2f}), reward {r['reward']:.3f}")
            finally:
                trainer.close()
    medians = {label: {k: median([r.get(k, 0.0) for r in (records[1:] or records)]) for k in PLACEMENT_STAGES}
               for label, records in all_records.items()}
    ref = medians["in-process, K=1"]
    result = {
        "machine": machine(), "iterations": iterations, "settings": PLACEMENTS,
        "stages": {k: {s: round(x, 2) for s, x in m.items()} for k, m in medians.items()},
        "relative_to_in_process": {k: round(m["iteration_s"] / ref["iteration_s"], 3) for k, m in medians.items()},
        "weight_sync_mb": next((round(r["weight_sync_mb"], 1) for rs in all_records.values() for r in rs if "weight_sync_mb" in r), None),
        "runs": rounded_runs(all_records, (*PLACEMENT_STAGES, "reward", "gen_tokens")),
    }
    write_json(json_path, result)
    cmd = bench_command("e2e --compare placement", config_path, iterations, overrides, json_path, record)
    log(write_section("e2e-placement", placement_markdown(result, cmd, iterations), path=results_file(record)))
    return result


def placement_markdown(r: dict, cmd: str, iterations: int) -> str:
    lines = markdown_head(
        "End to end: RL iterations in this process vs on Ray", cmd, r["machine"],
        f"Same config and seed in every row; the rows ran one after another. Medians over iterations 1..{iterations - 1} "
        "(iteration 0 pays warm-ups); K = generation instances, N = trainer processes; sync = the drafter refresh plus the "
        f"weight sync to the actors ({r['weight_sync_mb']} MB a time); with N trainers, training includes the gradient "
        "all-reduce (the last rank's seconds in it), the ranks' waiting for each other there, and rank 0's weights copied "
        "back into the driver; x = the row's iteration time over in-process K=1's.",
        ["setting", "generation s", "inference s", "training s", "of which all-reduce s", "ranks waiting s", "weights back s",
         "sync s", "of which weight sync s", "iteration s", "x"])
    for label, m in r["stages"].items():
        lines.append(f"| {label} | {m['generation_s']} | {m['inference_s']} | {m['training_s']} | {m['allreduce_s']} | "
                     f"{m['allreduce_wait_s']} | {m['weights_back_s']} | {m['sync_s']} | {m['weight_sync_s']} | "
                     f"{m['iteration_s']} | {r['relative_to_in_process'][label]:.2f} |")
    return "\n".join(lines)


def _precision_markdown(r: dict, cmd: str, iterations: int) -> str:
    lines = markdown_head(
        "End to end: RL iterations in float32 vs bfloat16", cmd, f"{r['machine']}; native bf16: {r['native_bf16']}",
        f"Same config and seed in every row; the rows ran round-robin (one iteration of each in turn, one process). "
        f"Medians over iterations 1..{iterations - 1} (iteration 0 pays warm-ups); "
        "x = the row's time over float32's; the rows' policies drift apart after iteration 0, so their completions (and "
        "token counts) differ: generation tok/s compares the engines; logprob gap = |engine - trainer| at iteration 0's "
        "check (nats, max / mean).",
        ["setting", "generation s", "generation tok/s", "inference s", "training s", "iteration s", "generation x", "training x",
         "iteration x", "logprob gap"])
    for label, m in r["stages"].items():
        x, gap = r["relative_to_float32"][label], r["logprob_gap"].get(label, {})
        gap_text = f"{gap['max']:.2g} / {gap['mean']:.2g}" if gap else ""
        lines.append(f"| {label} | {m['generation_s']} | {m['gen_tok_s']:.0f} | {m['inference_s']} | {m['training_s']} | {m['iteration_s']} | "
                     f"{x['generation_s']:.2f} | {x['training_s']:.2f} | {x['iteration_s']:.2f} | {gap_text} |")
    return "\n".join(lines)
