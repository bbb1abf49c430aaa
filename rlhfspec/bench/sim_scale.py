"""`rlhfspec bench sim-scale`: what speculation, the selector and reallocation are predicted to buy
on GPU clusters, from cited inputs.

Two scenarios (an 8B policy on 8 H100s, a 70B policy on 64), one GRPO-sized rollout each, response
lengths from a lognormal fitted to a published summary of reasoning-RL rollouts, and two
acceptance profiles: a published EAGLE-3 chain acceptance (optimistic) and this project's own
measured heads (pessimistic). Every number is a prediction of the simulator's roofline
(`bench sim-calibrate` compares it with published decode steps), not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhfspec.bench.common import results_file, write_json, write_section
from rlhfspec.errors import RlhfspecError
from rlhfspec.sim.ablation import SimConfig, ablation
from rlhfspec.sim.plots import sim_timeline


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    model: str  # a size the simulator's catalog maps to a published architecture
    tp: int
    instances: int
    max_batch: int  # the most live samples whose worst-case KV cache (prompt + CAP tokens each) fits next to the weights


SCENARIOS = (
    Scenario("8b", "Llama-3.1-8B on 8 H100 (8 instances, TP 1)", "8B", 1, 8, 48),
    Scenario("70b", "Llama-3.1-70B on 64 H100 (8 instances, TP 8)", "70B", 8, 8, 128),
)


@dataclass(frozen=True)
class Profile:
    key: str
    title: str
    acceptance: str  # per drafter, per-position acceptance (AcceptanceProfile.parse)
    source: str


# n-gram: this project's measured tokens per step at temperature 1 (benchmarks/spec.json, mean over
# batches): 1.10 at n = 1, 1.17 at n = 2, 1.16-1.19 from n = 3 on. Steps where it finds no match count
# as rejections, so p1 = 0.10 (below the 22% of proposed tokens accepted), p1 p2 = 0.07.
NGRAM = "ngram=0.1,0.7,0.1"
PROFILES = (
    Profile("eagle3", "EAGLE-3 head, published acceptance", f"eagle=0.72;{NGRAM}",
            "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B: 3.34 tokens per step on GSM8K at temperature 1, chains of K = 7 "
            "(RedHatAI's Llama-3.3-70B EAGLE-3 head: 3.29), as measured by "
            "https://huggingface.co/nebius/EAGLE3-Llama-3.3-70B-Instruct; p = 0.72 per position gives "
            "(1 - p^8) / (1 - p) = 3.31"),
    Profile("own", "this project's heads, measured", f"eagle=0.55,0.2,0.3;{NGRAM}",
            "benchmarks/spec_eagle.json at temperature 1: 1.55 tokens per step at n = 1, 1.65 at n = 2, "
            "1.69-1.71 from n = 3 on (SmolLM2-135M's head; a pessimistic case)"),
)

# Fitted to "median about 500, p99 about 5000" tokens, the per-rollout length distribution of a
# typical reasoning-RL run in https://jiahuanglin.xyz/all_lessons/RL/lessons/22b_longtail_rollouts.html:
# sigma = ln(5000 / 500) / 2.326 = 0.99; capped at 8,192 new tokens.
LENGTHS = "lognormal:500,0.99,8192"
LENGTHS_SOURCE = "https://jiahuanglin.xyz/all_lessons/RL/lessons/22b_longtail_rollouts.html"
# 512 prompts x 8 samples: inside the 400-800 prompts x 8-16 samples per iteration of the production
# GRPO workloads in Seer (https://arxiv.org/abs/2511.14617).
PROMPTS, SAMPLES, PROMPT_LEN = 512, 8, "256"


@dataclass
class SimScaleConfig:
    scale: float = 1.0  # fraction of the 512 prompts simulated (samples per prompt unchanged)
    scenarios: tuple[str, ...] = tuple(s.key for s in SCENARIOS)
    profiles: tuple[str, ...] = tuple(p.key for p in PROFILES)
    lengths: str = LENGTHS
    static_n: tuple[int, ...] = (1, 2, 4, 6)
    seed: int = 0

    def chosen(self) -> tuple[list[Scenario], list[Profile]]:
        if not 0 < self.scale <= 1:
            raise RlhfspecError(f"scale is {self.scale}; it must be in (0, 1] (the fraction of {PROMPTS} prompts simulated).")
        by_s, by_p = {s.key: s for s in SCENARIOS}, {p.key: p for p in PROFILES}
        for k in self.scenarios:
            if k not in by_s:
                raise RlhfspecError(f"scenario {k!r} is unknown; choose from {', '.join(by_s)}.")
        for k in self.profiles:
            if k not in by_p:
                raise RlhfspecError(f"acceptance profile {k!r} is unknown; choose from {', '.join(by_p)}.")
        return [by_s[k] for k in self.scenarios], [by_p[k] for k in self.profiles]

    def sim_config(self, s: Scenario, p: Profile) -> SimConfig:
        return SimConfig(accelerator="H100", model=s.model, tp=s.tp, instances=s.instances, max_batch=s.max_batch,
                         prompts=max(1, round(PROMPTS * self.scale)), samples=SAMPLES, lengths=self.lengths,
                         prompt_len=PROMPT_LEN, acceptance=p.acceptance, static_n=self.static_n, seed=self.seed)


def run(cfg: SimScaleConfig, json_path: str | None = None, record: bool = False, log=print) -> dict:
    scenarios, profiles = cfg.chosen()
    results = results_file(record)
    out: dict = {"simulated": True, "scale": cfg.scale, "lengths": cfg.lengths, "lengths_source": LENGTHS_SOURCE,
                 "scenarios": {}}
    for s in scenarios:
        entry = {"title": s.title, "profiles": {}}
        for p in profiles:
            log(f"{s.title}, {p.title}:")
            r = ablation(cfg.sim_config(s, p), log=lambda line: log("  " + line))
            if p is profiles[0]:
                entry["timeline"] = sim_timeline(r["runs"], s.instances, results.parent / f"sim_scale_timeline_{s.key}.png").name
            entry["profiles"][p.key] = {"title": p.title, "source": p.source, **{k: v for k, v in r.items() if k != "runs"}}
        out["scenarios"][s.key] = entry
    write_json(json_path, out)
    png = speedup_bars(out, results.parent / "sim_scale.png")
    log(write_section("sim-scale", markdown(out, cfg, json_path, record, png.name), path=results))
    return out


FEATURES = ("static", "adaptive selection", "reallocation", "all (adaptive + reallocation)")


def _row(rows: list[dict], feature: str) -> dict:
    return next(r for r in rows if r["feature"] == feature or (feature == "static" and r["feature"].startswith("static")))


def speedup_bars(result: dict, path: Path) -> Path:
    """Grouped bars: each feature's speedup over plain decoding, per scenario and acceptance profile."""
    from rlhfspec.bench.plots import _plt, _save

    plt = _plt()
    groups = [(s, p) for s in result["scenarios"].values() for p in s["profiles"].values()]
    fig, ax = plt.subplots(figsize=(2.6 * len(groups) + 1.5, 3.8))
    width = 0.8 / len(FEATURES)
    for j, feature in enumerate(FEATURES):
        xs = [i + (j - (len(FEATURES) - 1) / 2) * width for i in range(len(groups))]
        ys = [_row(p["rows"], feature)["speedup"] for _, p in groups]
        ax.bar(xs, ys, width, label="static speculation (best n)" if feature == "static" else feature)
        for x, y in zip(xs, ys):
            ax.text(x, y + 0.02, f"{y:.2f}", ha="center", fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s['title'].split(' on ')[0]}\n{p['title']}" for s, p in groups], fontsize=7)
    ax.set_ylabel("predicted speedup over plain decoding")
    ax.set_title("Simulated rollout makespan speedup (H100 roofline; predictions, not measurements)", fontsize=9)
    ax.set_ylim(0, 1.3 * max(r["speedup"] for _, p in groups for r in p["rows"]))
    ax.legend(fontsize=7, loc="upper center", ncol=len(FEATURES))
    return _save(fig, plt, path)


def markdown(result: dict, cfg: SimScaleConfig, json_path: str | None, record: bool, png: str) -> str:
    first = next(iter(next(iter(result["scenarios"].values()))["profiles"].values()))
    w = first["workload"]
    cmd = "rlhfspec bench sim-scale" + (f" --scale {cfg.scale:g}" if cfg.scale != 1 else "") \
        + (f" --lengths {cfg.lengths}" if cfg.lengths != LENGTHS else "") + (f" --json {json_path}" if json_path else "") \
        + (" --record" if record else "")
    fitted = f"; fitted to [median ~500, p99 ~5000]({result['lengths_source']})" if cfg.lengths == LENGTHS else ""
    lines = [
        "## What to expect at scale (simulated)", "",
        f"Command: `{cmd}`  ",
        "Machine: simulated H100s; every number below is a deterministic prediction of the simulator's roofline (spec "
        "sheet, bandwidth efficiency 0.8, FLOP efficiency 0.6, 1.5 ms per forward; see the sim-calibrate section) "
        "driving the real coordinator, rebalancer and strategies, the same on whatever machine computes it.  ",
        f"Rollout: {w['samples']} samples ({round(PROMPTS * cfg.scale)} prompts x {SAMPLES}), prompts {PROMPT_LEN} tokens, "
        f"response lengths `{result['lengths']}` (median {w['median']}, p90 {w['p90']}, max {w['max']}{fitted}).  ",
        "Speedup = plain decoding's makespan over the feature's; static speculation is the best fixed n of "
        f"{','.join(map(str, cfg.static_n))} with the first drafter; adaptive selection chooses among all drafters "
        "and n <= 8 at every step.", "",
    ]
    for s in result["scenarios"].values():
        profiles = list(s["profiles"].values())
        lines += [f"**{s['title']}**, at most {profiles[0]['config']['max_batch']} live samples per instance", ""]
        lines += ["| feature | " + " | ".join(f"{p['title']}: makespan s | tokens/s | speedup" for p in profiles) + " | moves |",
                  "|---|" + "---:|---:|---:|" * len(profiles) + "---:|"]
        for i, r0 in enumerate(profiles[0]["rows"]):
            name = r0["feature"]
            if name.startswith("static"):  # the best n may differ between profiles
                name = "static speculation (best n: " + " / ".join(_static(p["rows"][i]["feature"]) for p in profiles) + ")"
            cells = [f"{r['makespan_s']:.0f} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}" for r in (p["rows"][i] for p in profiles)]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {' / '.join(str(p['rows'][i]['moves']) for p in profiles)} |")
        lines.append("")
        for p in profiles:
            if p.get("static"):
                lines.append(f"Every fixed n, {p['title']}: " + ", ".join(f"{x['setting']} {x['speedup']:.2f}x" for x in p["static"]) + ".  ")
        lines.append("")
    lines += ["Acceptance profiles (per-position acceptance, temperature 1):", ""]
    for p in next(iter(result["scenarios"].values()))["profiles"].values():
        lines.append(f"- {p['title']}: `{p['config']['acceptance']}`; {p['source']}.")
    lines += ["", f"![speedup per feature]({png})", ""]
    for s in result["scenarios"].values():
        if "timeline" in s:
            lines.append(f"![{s['title']}: live samples and utilisation per instance]({s['timeline']})")
    return "\n".join(lines)


def _static(feature: str) -> str:
    """'static speculation (eagle n=2, best of n=1,2,4,6)' -> 'eagle n=2'."""
    return feature.split("(", 1)[1].split(",", 1)[0]
