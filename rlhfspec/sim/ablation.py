"""`rlhfspec simulate`: one rollout per feature set (plain, static speculation, adaptive selection,
reallocation, all of them) on a simulated cluster, with speedups over plain decoding."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rlhfspec.engine.spec import MAX_DRAFT_TOKENS, Adaptive, Static
from rlhfspec.errors import RlhfspecError
from rlhfspec.sim.cost import RooflineCost, StepCost, TableCost
from rlhfspec.models.config import ModelConfig
from rlhfspec.sim.hardware import Roofline, Shape, accelerator, model_config
from rlhfspec.sim.run import Cluster, SimRun, Workload, simulate
from rlhfspec.sim.workload import AcceptanceProfile, cap_of, lengths

# EAGLE-3 heads (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B) are one decoder layer of the policy's
# width with their own output layer over a 32k-token draft vocabulary.
EAGLE_DRAFT_VOCAB = 32000


def eagle_head(policy: ModelConfig) -> ModelConfig:
    """The architecture an EAGLE head of `policy` reads per draft token: one decoder layer of the
    policy's shape and an untied output layer over the draft vocabulary (its input embedding is the
    policy's, gathered, not read)."""
    return replace(policy, num_layers=1, vocab_size=min(policy.vocab_size, EAGLE_DRAFT_VOCAB), tie_word_embeddings=False)


@dataclass
class SimConfig:
    """A simulated rollout and the hardware it runs on. The workload defaults (lengths, acceptance)
    are assumptions for illustration; pass measured ones (a trace, a profile) to predict a real job."""

    # Cost: a measured step-time table (`table`), else the roofline of `model` on `accelerator`.
    table: str | None = None
    table_model: str | None = None
    accelerator: str = "H100"
    model: str = "7B"
    tp: int = 1
    draft_model: str = "0.5B"  # the "draft" drafter's architecture on the roofline
    bytes_per_param: float = 2.0  # weights and KV cache: 2 for bf16, 1 for fp8
    overhead_ms: float = 1.5
    # Cluster.
    instances: int = 8
    max_batch: int = 128
    steps_per_call: int | None = None
    migration: str = "auto"
    link_gb_per_s: float = 50.0
    # Workload: prompts x samples, in that order.
    prompts: int = 64
    samples: int = 16
    lengths: str = "lognormal:600,0.9,4096"
    max_new_tokens: int | None = None  # default: the lognormal CAP, or the trace's longest
    prompt_len: str = "256"
    acceptance: str = "draft=0.7"
    static_n: tuple[int, ...] = (2, 4, 6)
    max_n: int = 8
    seed: int = 0

    def check(self) -> None:
        if self.prompts < 1 or self.samples < 1:
            raise RlhfspecError(f"prompts ({self.prompts}) and samples ({self.samples}) must be at least 1.")
        for n in (*self.static_n, self.max_n):
            if not 1 <= n <= MAX_DRAFT_TOKENS:
                raise RlhfspecError(f"draft length {n} must be between 1 and {MAX_DRAFT_TOKENS}.")
        if self.overhead_ms < 0 or self.link_gb_per_s <= 0 or self.bytes_per_param <= 0:
            raise RlhfspecError("overhead_ms must be >= 0, and link_gb_per_s and bytes_per_param > 0.")


def build(cfg: SimConfig) -> tuple[StepCost, Workload, Cluster, str]:
    """The cost model, workload and cluster a config describes, and a line describing the cost."""
    cfg.check()
    acceptance = AcceptanceProfile.parse(cfg.acceptance, cfg.seed)
    n = cfg.prompts * cfg.samples
    response = lengths(cfg.lengths, n, cfg.seed, "lengths")
    per_prompt = lengths(cfg.prompt_len, cfg.prompts, cfg.seed + 1, "prompt_len")
    cap = cfg.max_new_tokens or cap_of(cfg.lengths) or max(response)
    work = Workload([p for p in per_prompt for _ in range(cfg.samples)], response, cap, acceptance,
                    prompt_ids=[i for i in range(cfg.prompts) for _ in range(cfg.samples)])
    cluster = Cluster(cfg.instances, cfg.max_batch, cfg.steps_per_call, cfg.migration, cfg.link_gb_per_s * 1e9)
    if cfg.table:
        cost = TableCost.load(cfg.table, cfg.table_model)
        for d in acceptance.drafters:
            cost.draft(d, 1, 1, 0.0)  # one sentence now, before any rollout, for a drafter the table cannot price
        return cost, work, cluster, f"measured step-time table {cost.source}"
    gpu = accelerator(cfg.accelerator)
    policy = model_config(cfg.model)
    roof = Roofline(gpu, Shape.of(policy, cfg.bytes_per_param), cfg.tp, overhead_s=cfg.overhead_ms * 1e-3)
    roof.fits(cfg.max_batch, max(work.prompt_lens) + cap, f"model {cfg.model}")
    # The drafters with a forward of their own on the same GPUs (n-gram drafting is host work).
    heads = {"draft": (lambda: model_config(cfg.draft_model), f"draft model {cfg.draft_model}"),
             "eagle": (lambda: eagle_head(policy), f"eagle head (one layer of the policy, {EAGLE_DRAFT_VOCAB // 1000}k draft vocabulary)")}
    drafts, named = {}, []
    for name in acceptance.drafters:
        if name in heads:
            arch, what = heads[name]
            drafts[name] = Roofline(gpu, Shape.of(arch(), cfg.bytes_per_param), cfg.tp, overhead_s=cfg.overhead_ms * 1e-3)
            named.append(what)
    desc = (f"roofline of {cfg.model} ({policy.num_params / 1e9:.1f}B) on {cfg.instances} x {cfg.tp} {gpu.name} "
            f"(tensor-parallel {cfg.tp}), {', '.join(named + [f'{cfg.overhead_ms:g} ms per-step overhead'])}")
    return RooflineCost(roof, drafts), work, cluster, desc


def ablation(cfg: SimConfig, log=print) -> dict:
    """Plain, static speculation (best n of cfg.static_n), adaptive selection, reallocation, all."""
    cost, work, cluster, desc = build(cfg)
    drafter = work.acceptance.drafters[0] if work.acceptance.drafters else None
    runs: dict[str, SimRun] = {"plain": simulate(cost, work, cluster, None, False, cfg.seed, "plain")}
    statics: list[SimRun] = []
    if drafter is not None:
        statics = [simulate(cost, work, cluster, Static(drafter, n), False, cfg.seed, f"static {drafter} n={n}") for n in cfg.static_n]
        best = min(statics, key=lambda r: r.makespan_s)
        runs[f"static speculation ({best.label.removeprefix('static ')}, best of n={','.join(map(str, cfg.static_n))})"] = best
        runs["adaptive selection"] = simulate(cost, work, cluster, Adaptive(cfg.max_n), False, cfg.seed, "adaptive")
    if cluster.instances > 1:
        runs["reallocation"] = simulate(cost, work, cluster, None, True, cfg.seed, "reallocation")
        if drafter is not None:
            runs["all (adaptive + reallocation)"] = simulate(cost, work, cluster, Adaptive(cfg.max_n), True, cfg.seed, "all")
    plain = runs["plain"]
    rows = []
    for name, r in runs.items():
        rows.append({
            "feature": name, "makespan_s": round(r.makespan_s, 3), "tokens": r.tokens, "tokens_per_s": round(r.tokens_per_s, 1),
            "speedup": round(plain.makespan_s / r.makespan_s, 3), "utilisation": [round(u, 3) for u in r.utilisation],
            "mean_utilisation": round(sum(r.utilisation) / len(r.utilisation), 3), "moves": r.moves, "steps": r.steps,
            "speculative_steps": r.speculative_steps, "acceptance": round(r.accepted / r.proposed, 3) if r.proposed else None,
            "tokens_per_step": round(r.tokens_per_step, 3), "selector_cpu_s": round(r.decide_wall_s, 3),
            "utilisation_curve": r.utilisation_curve(),
        })
        log(f"{name:60} {r.makespan_s:9.1f} s  {r.tokens_per_s:9.0f} tok/s  {plain.makespan_s / r.makespan_s:5.2f}x  "
            f"util {sum(r.utilisation) / len(r.utilisation):.0%}  moves {r.moves}")
    lens = sorted(work.target(i) for i in range(len(work.lengths)))
    return {
        "simulated": True, "cost": desc, "config": asdict(cfg),
        "workload": {"samples": len(lens), "max_new_tokens": work.max_new_tokens, "median": lens[len(lens) // 2],
                     "p90": lens[int(0.9 * (len(lens) - 1))], "max": lens[-1], "tokens": sum(lens),
                     "acceptance": work.acceptance.rates},
        "rows": rows, "runs": runs,
        # Every static n tried, not only the best: what a fixed n costs when it is not the right one.
        "static": [{"setting": r.label.removeprefix("static "), "makespan_s": round(r.makespan_s, 3),
                    "speedup": round(plain.makespan_s / r.makespan_s, 3)} for r in statics],
    }


def markdown(result: dict) -> str:
    w = result["workload"]
    lines = [
        f"Simulated: {result['cost']}.  ",
        f"{w['samples']} samples, response length median {w['median']}, p90 {w['p90']}, max {w['max']} "
        f"(max_new_tokens {w['max_new_tokens']}); acceptance per position {w['acceptance']}.",
        "",
        "| feature | makespan s | tokens/s | speedup vs plain | mean utilisation | moves | speculative steps | tokens/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['feature']} | {r['makespan_s']:.1f} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f} | "
                     f"{r['mean_utilisation']:.0%} | {r['moves']} | {r['speculative_steps']} of {r['steps']} | {r['tokens_per_step']:.2f} |")
    return "\n".join(lines)


def write_outputs(result: dict, json_path: str | None, plot_path: str | None, instances: int) -> list[Path]:
    """The JSON (everything but the run objects) and the utilisation timeline PNG."""
    out = []
    if json_path:
        p = Path(json_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
        out.append(p)
    if plot_path:
        from rlhfspec.sim.plots import sim_timeline

        out.append(sim_timeline(result["runs"], instances, Path(plot_path)))
    return out
