"""`rlhfspec bench sim-validate`: the simulator's predicted wall time of real runs on this machine.

It runs `bench rollout` (every drafting policy, one instance) and `bench realloc` (K instances,
reallocation off and on), keeps of each run only what it generated (prompt and response lengths,
per-position draft acceptance), measures this machine's step-time tables apart from those runs,
feeds both to the simulator, and compares the predicted wall time with the measured one. The
simulator never sees a run's timings: `predict` takes a workload trace and a table, nothing else.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from rlhfspec.bench.common import machine, results_file, write_json, write_section
from rlhfspec.engine.drafters import Drafter, Proposal
from rlhfspec.engine.instance import GenerationInstance
from rlhfspec.engine.profile import invariant_for
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.sequence import Sequence
from rlhfspec.engine.spec import StrategySpec
from rlhfspec.errors import RlhfspecError
from rlhfspec.sim.cost import TableCost
from rlhfspec.sim.run import Cluster, SimRun, Workload, simulate
from rlhfspec.sim.workload import AcceptanceProfile
from rlhfspec.strategy.base import Decision
from rlhfspec.strategy.cost_model import Table

# prompt_ids (which samples share a prompt, and so its prefill) is absent from traces written before shared prefills.
TRACE_KEYS = ("prompt_lens", "lengths", "prompt_ids", "acceptance")


class _Repeat(Drafter):
    """Drafts the last token n times: every row gets its full n, whatever the prompt, so a step
    times verifying n drafts (forward, acceptance, resampling, rollback) at no drafting cost."""

    name = "repeat"

    def propose(self, seqs: list[Sequence], n: list[int]) -> Proposal:
        return Proposal([[s.tokens[-1]] * k for s, k in zip(seqs, n)], None)

    def replica(self) -> _Repeat:
        return _Repeat()


def step_times(policy, drafters: list, batches=(1, 2, 4, 8, 16, 32, 64), ns=(1, 2, 4), repeats: int = 3,
               prompt_len: int = 48, seed: int = 0, batch_invariant: bool = True) -> TableCost:
    """Whole engine steps timed on random prompts (not on any run being predicted): per batch B,
    a plain step (forward and sampling: verify(B, 1)), verifying n drafts (verify(B, n + 1): the
    forward, acceptance, resampling and rollback of a step whose drafts all fill their n), and
    each drafter proposing n (draft(B, n)); medians of `repeats` after one warm-up step. Also
    the prefill's seconds per token (from the largest batch) and the KV bytes per token."""
    verify: Table = {}
    drafters = [_Repeat(), *drafters]
    drafts: dict[str, Table] = {d.name: {} for d in drafters}
    configs = [(None, 0)] + [(d.name, n) for d in drafters for n in ns]
    max_new = 2 + (repeats + 1) * sum(n + 1 for _, n in configs)
    gen = torch.Generator().manual_seed(seed)
    prefill = None
    for b in batches:
        inst = GenerationInstance(policy, b, prompt_len + max_new + 1, drafters=[d.replica() for d in drafters],
                                  batch_invariant=batch_invariant)
        params = SamplingParams(temperature=1.0, max_new_tokens=max_new, ignore_eos=True)
        seqs = [Sequence(i, torch.randint(3, policy.config.vocab_size, (prompt_len,), generator=gen).tolist(), params, seed)
                for i in range(b)]
        t = time.perf_counter()
        inst.add(seqs)
        prefill = (time.perf_counter() - t) / (b * prompt_len)
        for name, n in configs:
            for _ in range(repeats + 1):
                inst.step(Decision(name, [n] * b))
            recs = inst.stats.records[-repeats:]
            if name is None:
                verify[(b, 1)] = statistics.median(r.verify_s for r in recs)
                continue
            if name == _Repeat.name:
                verify[(b, n + 1)] = statistics.median(r.verify_s for r in recs)
            else:
                drafts[name][(b, n)] = statistics.median(r.draft_s for r in recs)
    drafts.pop(_Repeat.name)
    ngram = drafts.pop("ngram", None)
    per_ngram = statistics.median(t / (b * n) for (b, n), t in ngram.items()) if ngram else None
    cost = TableCost(verify, drafts, kv_bytes_per_token=float(inst.kv_bytes_per_token), source="whole engine steps",
                     prefill_seconds_per_token=prefill)
    if per_ngram is not None:
        cost.ngram_seconds_per_row_token = per_ngram
    return cost


def predict(trace: dict, cost: TableCost, cluster: Cluster, strategy: StrategySpec | None, max_new_tokens: int,
            drafters: list[str], realloc: bool = False, seed: int = 0) -> SimRun:
    """The simulated rollout of a run's workload trace (TRACE_KEYS only) on a measured table. A
    drafter the run never drafted with is given acceptance 0 (nothing measured says otherwise)."""
    extra = set(trace) - set(TRACE_KEYS)
    if extra:
        raise ValueError(f"a workload trace holds only {TRACE_KEYS}; got {sorted(extra)} too.")
    rates = {d: trace["acceptance"].get(d, [0.0]) for d in drafters}
    work = Workload(trace["prompt_lens"], trace["lengths"], max_new_tokens, AcceptanceProfile(rates, seed), trace.get("prompt_ids"))
    return simulate(cost, work, cluster, strategy, realloc, seed, drafters=drafters)


def row(run: str, policy: str, measured_s: float, predictions: dict[str, SimRun], measured_split: dict | None = None) -> dict:
    """A table row; with the real run's `time_split`, also each prediction's, to show where a miss lies
    (compared after the simulation, which never saw them)."""
    out = {"run": run, "policy": policy, "measured_s": round(measured_s, 2)}
    for table, sim in predictions.items():
        out[f"{table}_s"] = round(sim.makespan_s, 2)
        out[f"{table}_error"] = round(sim.makespan_s / measured_s - 1, 3)
        out[f"{table}_moves"] = sim.moves
    if measured_split:
        out["split"] = {"measured": _unrecorded(measured_split, measured_s),
                        **{table: _unrecorded(sim.split, sim.makespan_s) for table, sim in predictions.items()}}
    return out


def _unrecorded(split: dict, wall_s: float) -> dict:
    """The split with the wall seconds no step or prefill recorded (the engine's loop around them)."""
    recorded = sum(v for k, v in split.items() if k.endswith("_s"))
    return {k: round(v, 3) for k, v in {**split, "unrecorded_s": wall_s - recorded}.items()}


@dataclass
class SimValidateConfig:
    full: bool = False  # the benches' default sizes, not their --quick ones
    realloc: bool = True  # also bench realloc (Ray actors)
    repeats: int = 3  # steps timed per table cell
    seed: int = 0
    device: str = "cpu"  # cuda: bench rollout and the tables on the GPU (bfloat16, fast forward); no realloc rows there

    def __post_init__(self):
        if self.device != "cpu" and self.realloc:
            raise RlhfspecError(f"bench sim-validate on {self.device} validates bench rollout only; add --no-realloc.")


def run(cfg: SimValidateConfig, json_path: str | None = None, record: bool = False, log=print) -> dict:
    from rlhfspec.bench import realloc as realloc_bench
    from rlhfspec.bench import rollout as rollout_bench
    from rlhfspec.engine.drafters import NgramDrafter
    from rlhfspec.engine.profile import cost_model
    from rlhfspec.engine.spec import DraftModel
    from rlhfspec.models.loader import load_model
    from rlhfspec.paths import default_cache_dir, default_draft_path

    rcfg = rollout_bench.RolloutBenchConfig(device=cfg.device) if cfg.full else rollout_bench.RolloutBenchConfig.make_quick(device=cfg.device)
    log("== the real runs (their timings are kept for the comparison only) ==")
    rollout = rollout_bench.run(rcfg, log=log)
    mcfg = realloc_bench.ReallocBenchConfig() if cfg.full else realloc_bench.ReallocBenchConfig.make_quick()
    realloc = realloc_bench.run(mcfg, log=log) if cfg.realloc else None
    log("== this machine's step-time tables, measured apart from the runs ==")
    policy, tok = load_model(rcfg.model, device=cfg.device)
    draft = DraftModel(str(default_draft_path())).build(policy, tok)
    drafters = [NgramDrafter(), draft]
    # The table the engine's selector itself starts from (cached by the adaptive run above).
    profile = cost_model(policy, {d.name: d for d in drafters}, default_cache_dir())
    steps = step_times(policy, drafters, repeats=cfg.repeats, batch_invariant=invariant_for(cfg.device))
    engine = TableCost(profile.verify_table, profile.draft_tables, steps.ngram_seconds_per_row_token, steps.kv_bytes_per_token,
                       "the selector's profile", steps.prefill_seconds_per_token)
    for c in (engine, steps):
        c.selector_profile = profile
    tables = {"profile": engine, "steps": steps}
    rows = []
    names = [d.name for d in drafters]
    for label, strategy in rollout_bench.policies(rcfg).items():
        real = next(r for r in rollout["rows"] if r["policy"] == label)
        trace = rollout["workloads"][label]
        sims = {k: predict(trace, c, Cluster(1, rcfg.batch_size), strategy, rcfg.max_new_tokens, names, seed=cfg.seed)
                for k, c in tables.items()}
        rows.append(row("rollout", label, real["wall_s"], sims, real["split"]))
        log(_line(rows[-1]))
    if realloc is not None:
        threads = torch.get_num_threads()
        torch.set_num_threads(mcfg.threads)
        try:
            one = step_times(policy, [], batches=(1, 2, 4, 8, 16), repeats=cfg.repeats)
            forward = TableCost(cost_model(policy, {}).verify_table, kv_bytes_per_token=one.kv_bytes_per_token,
                                source="the selector's profile", prefill_seconds_per_token=one.prefill_seconds_per_token)
        finally:
            torch.set_num_threads(threads)
        cluster = Cluster(mcfg.instances, mcfg.max_batch, migration="auto", link_latency_s=1e-3)
        for mode in ("off", "on"):
            sims = {k: predict(realloc["workload"], c, cluster, None, mcfg.max_new_tokens, [], realloc=mode == "on", seed=cfg.seed)
                    for k, c in {"profile": forward, "steps": one}.items()}
            rows.append(row(f"realloc K={mcfg.instances} ({mcfg.threads} thread each)", f"realloc {mode}", realloc[f"{mode}_s"], sims))
            log(_line(rows[-1]))
    result = {"machine": machine(), "quick": not cfg.full, "rows": rows,
              "tables": {k: c.to_json() for k, c in tables.items()}, "realloc_tables": {} if realloc is None else
              {"profile": forward.to_json(), "steps": one.to_json()}}
    write_json(json_path, result)
    section = "sim-validate" + ("-full" if cfg.full else "") + ("" if cfg.device == "cpu" else f"-{cfg.device}")
    log(write_section(section, _markdown(result, cfg, json_path), path=results_file(record)))
    return result


def _line(r: dict) -> str:
    return (f"{r['run']:30} {r['policy']:45} measured {r['measured_s']:6.1f} s, predicted {r['profile_s']:6.1f} s "
            f"({r['profile_error']:+.0%}) from the profile, {r['steps_s']:6.1f} s ({r['steps_error']:+.0%}) from whole steps")


def _markdown(result: dict, cfg: SimValidateConfig, json_path: str | None) -> str:
    lines = [
        "## Simulator vs real runs " + ("on this machine" if cfg.device == "cpu" else f"on {cfg.device}")
        + (" (the benches at full size)" if cfg.full else ""),
        "",
        f"Command: `rlhfspec bench sim-validate{' --full' if cfg.full else ''}{'' if cfg.realloc else ' --no-realloc'}"
        f"{'' if cfg.device == 'cpu' else f' --device {cfg.device}'} --record"
        f"{f' --json {json_path}' if json_path else ''}`  ",
        f"Machine: {result['machine']}  ",
        f"`bench rollout{'' if cfg.full else ' --quick'}`" + (f" and `bench realloc{'' if cfg.full else ' --quick'}`" if cfg.realloc else "")
        + " ran first; the simulator "
        "got only their prompt and response lengths and per-position draft acceptance, and a step-time table measured "
        "apart from them: `profile` is the selector's own forward-time profile (forward passes only), `steps` times whole "
        "engine steps (forward, sampling, verification, drafting) on random prompts. Error = predicted / measured - 1.",
        "",
        "| run | policy | measured s | predicted s (profile) | error | predicted s (steps) | error |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['run']} | {r['policy']} | {r['measured_s']} | {r['profile_s']} | {r['profile_error']:+.1%} | "
                     f"{r['steps_s']} | {r['steps_error']:+.1%} |")
    split = [r for r in result["rows"] if "split" in r]
    if split:
        lines += ["", "Where the seconds went, measured / predicted from whole steps (compared after the simulation; "
                  "unrecorded = wall time outside every step and prefill: the engine's loop around them):", "",
                  "| policy | steps | speculative steps | prefill s | draft s | verify s | unrecorded s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in split:
            m, p = r["split"]["measured"], r["split"]["steps"]
            cells = [f"{m[k]:g} / {p[k]:g}" if k.endswith("steps") else f"{m[k]:.2f} / {p[k]:.2f}"
                     for k in ("steps", "speculative_steps", "prefill_s", "draft_s", "verify_s", "unrecorded_s")]
            lines.append(f"| {r['policy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
