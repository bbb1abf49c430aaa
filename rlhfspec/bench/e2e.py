"""`rlhfspec bench e2e`: the same RL iterations with every generation feature off vs on."""

from __future__ import annotations

import tempfile
import traceback
from dataclasses import replace
from pathlib import Path

from rlhfspec.allocator import release_memory
from rlhfspec.bench.common import bench_command, machine, median, results_file, write_json, write_section
from rlhfspec.errors import RlhfspecError
from rlhfspec.rl.config_files import load_config

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
    # The default run with its one generation instance moved to a Ray actor (run.threads threads):
    # what Ray itself costs, apart from splitting generation over K = 2 one-thread instances.
    "Ray, K=1 actor, N=1": ["--generation.backend", "ray"],
    "Ray, K=2 actors, N=1": RAY,
    "Ray, K=2 actors, N=2 trainers": [*RAY, "--train.workers", "2"],
}
# `--compare sharding`: N = 2 trainer processes with the optimizer state replicated vs sharded, generation in this process.
SHARDINGS = {
    "N=2 trainers, optimizer state replicated": ["--train.workers", "2", "--train.shard_optimizer", "false"],
    "N=2 trainers, optimizer state sharded": ["--train.workers", "2", "--train.shard_optimizer", "true"],
}


def run(config_path: str | None = None, iterations: int = 4, overrides: list[str] | None = None,
        json_path: str | None = None, record: bool = False, log=print, compare: str = "features") -> dict:
    """compare "features" (below), "precision" (`run_precision`), "placement" (`run_placement`),
    "prompts" or "skip" (`run_trainer_setting`)."""
    if compare == "precision":
        return run_precision(config_path, iterations, overrides, json_path, record, log)
    if compare in ("placement", "sharding"):
        return run_placement(config_path, iterations, overrides, json_path, record, log, compare)
    from rlhfspec.bench.e2e_settings import TRAINER_SETTINGS, run_trainer_setting

    if compare in TRAINER_SETTINGS:
        return run_trainer_setting(compare, config_path, iterations, overrides, json_path, record, log)
    if compare != "features":
        raise ValueError(f"bench e2e compares features, precision, placement, sharding, prompts, skip, checkpointing or logits, not {compare!r}")
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
    digits = {"reward": 4, "loss": 8, "grad_norm": 8}
    return {label: [{k: round(r[k], digits.get(k, 2)) for k in keys if r.get(k) is not None} for r in records]
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


PLACEMENT_STAGES = (*STAGES, "weight_sync_s", "allreduce_s", "allreduce_wait_s", "weights_back_s", "optimizer_state_mb", "worker_peak_mb")


def run_placement(config_path: str | None, iterations: int, overrides: list[str] | None, json_path: str | None,
                  record: bool, log, compare: str = "placement") -> dict:
    """The same iterations from the same seed with the generation instances and the trainer in
    this process or on Ray (compare "placement": PLACEMENTS), or with N = 2 trainers keeping the
    optimizer state replicated or sharded ("sharding": SHARDINGS). The rows run one after another
    (each row's trainers and actors together would not fit in memory beside another's); stage times
    are medians over iterations 1.. . Each row runs in a fresh process, so that no row inherits an
    earlier one's heap (whose freed memory the run keeps, `run.keep_freed_memory`) or threads.
    Batch-invariant generation makes every row's rollouts the same samples (the sharding rows'
    updates are equal too, so their samples stay the same throughout)."""
    rows = SHARDINGS if compare == "sharding" else PLACEMENTS
    all_records: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="rlhfspec-bench-") as tmp:
        for i, (label, extra) in enumerate(rows.items()):
            args = [*(overrides or []), *extra, "--train.iterations", str(iterations), "--run.output_dir", str(Path(tmp) / f"run{i}"),
                    "--run.tensorboard", "false", "--run.checkpoint_every", str(iterations)]
            all_records[label] = _in_fresh_process(_placement_row, (config_path, args, iterations, label), label, log)
    medians = {label: {k: median([r.get(k) or 0.0 for r in (records[1:] or records)]) for k in PLACEMENT_STAGES}
               for label, records in all_records.items()}
    ref = medians[next(iter(rows))]
    result = {
        "machine": machine(), "iterations": iterations, "settings": rows,
        "stages": {k: {s: round(x, 2) for s, x in m.items()} for k, m in medians.items()},
        f"relative_to_{'replicated' if compare == 'sharding' else 'in_process'}": {k: round(m["iteration_s"] / ref["iteration_s"], 3)
                                                                                   for k, m in medians.items()},
        "weight_sync_mb": next((round(r["weight_sync_mb"], 1) for rs in all_records.values() for r in rs if "weight_sync_mb" in r), None),
        "runs": rounded_runs(all_records, (*PLACEMENT_STAGES, "reward", "gen_tokens", "loss", "grad_norm")),
    }
    if compare == "sharding":  # equal updates: every iteration's tokens, reward, loss and gradient norm the same in both rows
        same = ("gen_tokens", "reward", "loss", "grad_norm")
        first, second = (all_records[label] for label in rows)
        result["same_runs"] = all([a[k] for k in same] == [b[k] for k in same] for a, b in zip(first, second))
    write_json(json_path, result)
    cmd = bench_command(f"e2e --compare {compare}", config_path, iterations, overrides, json_path, record)
    markdown = sharding_markdown if compare == "sharding" else placement_markdown
    log(write_section(f"e2e-{compare}", markdown(result, cmd, iterations), path=results_file(record)))
    return result


def _placement_row(config_path: str | None, args: list[str], iterations: int, label: str, log) -> list[dict]:
    """One placement row's iterations (run in a fresh process: see `_in_fresh_process`)."""
    from rlhfspec.rl.trainer import Trainer

    cfg = load_config(config_path, args)
    records = []
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
    return records


def _in_fresh_process(fn, args: tuple, name: str, log):
    """fn(*args, log) in a new Python process (spawned, so nothing of this one's heap, threads or
    earlier rows' Ray sessions carries over into the row it measures); its log lines are passed
    on as they come, its return value returned, its error raised here as one sentence."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(fn, args, theirs))
    child.start()
    theirs.close()  # the child's end: once the child is gone, reading ours ends
    try:
        while True:
            try:
                kind, value = ours.recv()
            except EOFError:
                child.join()
                raise RlhfspecError(f"the bench's process for {name!r} ended (exit code {child.exitcode}) without a result; "
                                    "see its output above (a process killed for memory exits -9).") from None
            if kind == "log":
                log(value)
            elif kind == "error":
                raise RlhfspecError(value)
            else:
                return value
    finally:
        ours.close()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()


def _child(fn, args: tuple, conn) -> None:
    try:
        conn.send(("done", fn(*args, lambda m: conn.send(("log", m)))))
    except RlhfspecError as e:
        conn.send(("error", str(e)))
    except BaseException as e:  # (a row's failure is the parent's to report; its traceback goes to stderr)
        traceback.print_exc()
        conn.send(("error", f"{type(e).__name__}: {e}"))


def sharding_markdown(r: dict, cmd: str, iterations: int) -> str:
    head = markdown_head(
        "End to end: data-parallel training with the optimizer state replicated vs sharded", cmd, r["machine"],
        f"Same config and seed in both rows, run one after the other, generation in the driver, N = 2 training workers. "
        f"Medians over iterations 1..{iterations - 1} (iteration 0 pays warm-ups); training includes the gradient sum over "
        "the ranks (all-reduce, or reduce-scatter plus the broadcasts of the updated weights when sharded: the last rank's "
        "seconds there), the ranks' waiting for each other and rank 0's weights back into the driver; optimizer state = the "
        "AdamW moments one worker holds; worker peak = the most memory the largest worker has held since it started (on the "
        "CPU its peak resident set, on a GPU torch's peak allocation); x = the row's iteration time over the first row's. "
        f"Every iteration's tokens, reward, loss and gradient norm equal in both rows: {r['same_runs']}.",
        ["setting", "generation s", "training s", "of which gradient sum s", "ranks waiting s", "weights back s",
         "optimizer state MB per worker", "worker peak MB", "iteration s", "x"])
    keys = ("generation_s", "training_s", "allreduce_s", "allreduce_wait_s", "weights_back_s", "optimizer_state_mb", "worker_peak_mb", "iteration_s")
    return _stage_rows(head, r, keys, "relative_to_replicated")


def placement_markdown(r: dict, cmd: str, iterations: int) -> str:
    head = markdown_head(
        "End to end: RL iterations in this process vs on Ray", cmd, r["machine"],
        f"Same config and seed in every row; the rows ran one after another. Medians over iterations 1..{iterations - 1} "
        "(iteration 0 pays warm-ups); K = generation instances, N = trainer processes; sync = the drafter refresh plus the "
        f"weight sync to the actors ({r['weight_sync_mb']} MB a time); with N trainers, training includes the gradient "
        "all-reduce (the last rank's seconds in it), the ranks' waiting for each other there, and rank 0's weights copied "
        "back into the driver; x = the row's iteration time over in-process K=1's.",
        ["setting", "generation s", "inference s", "training s", "of which all-reduce s", "ranks waiting s", "weights back s",
         "sync s", "of which weight sync s", "iteration s", "x"])
    keys = ("generation_s", "inference_s", "training_s", "allreduce_s", "allreduce_wait_s", "weights_back_s", "sync_s", "weight_sync_s", "iteration_s")
    return _stage_rows(head, r, keys, "relative_to_in_process")


def _stage_rows(head: list[str], r: dict, keys: tuple, relative: str) -> str:
    """The table: `head`, then a row per setting of its median `keys` (megabytes as whole numbers)
    and its iteration time relative to the reference row's (r[relative])."""
    rows = [f"| {label} | " + " | ".join(f"{m[k]:.0f}" if k.endswith("_mb") else str(m[k]) for k in keys) +
            f" | {r[relative][label]:.2f} |" for label, m in r["stages"].items()]
    return "\n".join([*head, *rows])


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
