"""`rlhfspec bench rollout`: a GRPO-style rollout under different drafting policies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhfspec.bench.common import machine, results_file, write_json, write_section
from rlhfspec.data.chat import encode_prompt
from rlhfspec.data.tasks import rl_style_prompts
from rlhfspec.engine.drafters import NgramDrafter
from rlhfspec.engine.profile import invariant_for
from rlhfspec.engine.report import time_split
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.sequence import first_with_prompt
from rlhfspec.engine.spec import TREE_BRANCHES, Adaptive, DraftModel, Eagle, EngineSpec, Ngram, Static, Threshold
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.loader import load_model
from rlhfspec.paths import default_draft_path
from rlhfspec.rollout.generate import Placement, live_parts, run_generation


@dataclass
class RolloutBenchConfig:
    model: str = "default"
    draft: str | None = None
    prompts: int = 8
    samples: int = 8
    max_new_tokens: int = 256
    batch_size: int = 64
    statics: tuple[tuple[str, int], ...] = (("ngram", 2), ("draft", 1), ("draft", 2))
    threshold_batch: int = 32
    seed: int = 7
    quick: bool = False
    instances: int = 1  # above 1 (or backend "ray"): the rollout is spread over instances by the coordinator
    backend: str = "inproc"
    realloc: bool = True
    ray_address: str | None = None
    eagle: bool = False  # also the default eagle head, as chains ("eagle") and as trees ("eagle-tree")
    device: str = "cpu"  # cuda: the policy in bfloat16 on the GPU, the fast (not batch-invariant) forward, in-process

    def __post_init__(self):
        if self.device != "cpu" and (self.backend == "ray" or self.instances > 1):
            raise RlhfspecError(f"bench rollout on {self.device} runs one in-process instance; drop --instances and --backend.")
        if self.eagle and not any(name.startswith("eagle") for name, _ in self.statics):
            self.statics = self.statics + (("eagle", 1), ("eagle-tree", 1))

    @classmethod
    def make_quick(cls, **kw) -> RolloutBenchConfig:
        return cls(prompts=4, samples=4, max_new_tokens=96, statics=(("ngram", 2), ("draft", 2)), quick=True, **kw)


def run(cfg: RolloutBenchConfig, json_path: str | None = None, record: bool = False, log=print) -> dict:
    policy, tok = load_model(cfg.model, device=cfg.device)
    invariant = invariant_for(cfg.device)
    draft_path = Path(cfg.draft) if cfg.draft else default_draft_path()
    loaded = DraftModel(str(draft_path)).build(policy, tok)
    # Held-out prompts: the drafters were trained on the other RL-style prompts.
    texts = rl_style_prompts(cfg.prompts, seed=cfg.seed, heldout=True)
    prompts = [encode_prompt(tok, t) for t in texts for _ in range(cfg.samples)]
    params = SamplingParams(temperature=1.0, max_new_tokens=cfg.max_new_tokens)
    drafters = (Ngram(), DraftModel(str(draft_path)))
    heads = []
    if cfg.eagle:
        from rlhfspec.bench.spec import ensure_default_eagle

        path = str(ensure_default_eagle(policy, tok, log))
        drafters += (Eagle(path), Eagle(path, "eagle-tree", TREE_BRANCHES))
        heads = [d.build(policy, tok) for d in drafters[2:]]
    placement = Placement(cfg.instances, cfg.backend, realloc=cfg.realloc, ray_address=cfg.ray_address)

    def live(strategy) -> list | None:
        """In-process instances share the loaded draft model and heads (replicas), so no policy reloads them."""
        if placement.backend == "ray":
            return None
        ds = [NgramDrafter(), loaded.replica()] + [h.replica() for h in heads]
        return live_parts(ds if strategy is not None else [], strategy, policy, placement.instances)

    warm = EngineSpec(drafters, Static("draft", 2), model=cfg.model, batch_invariant=invariant)
    warm_live = live(Static("draft", 2))
    run_generation(warm, prompts[:2], SamplingParams(max_new_tokens=8), model=policy, tokenizer=tok,
                   live=warm_live[:1] if warm_live is not None else None)
    rows, traces, workloads = [], {}, {}
    multi = cfg.instances > 1 or cfg.backend == "ray"
    for label, strategy in policies(cfg).items():
        spec = EngineSpec(drafters if strategy is not None else (), strategy, cfg.batch_size, model=cfg.model, batch_invariant=invariant)
        result = run_generation(spec, prompts, params, cfg.seed, placement=placement, model=policy, tokenizer=tok, live=live(strategy))
        outs, wall = result.outputs, result.seconds
        traces[label] = result.timeline if multi else result.stats[0].records
        records = [r for st in result.stats for r in st.records]
        workloads[label] = workload_trace(prompts, outs, records)
        decide = sorted(r.decide_s for r in records)
        tokens = result.tokens
        rows.append({"policy": label, "wall_s": round(wall, 2), "tokens": tokens, "tok_s": round(tokens / wall, 1),
                     "acceptance": None if result.acceptance is None else round(result.acceptance, 3),
                     "decide_ms": round(1e3 * decide[len(decide) // 2], 3) if decide else None,
                     "decide_share": round(sum(decide) / sum(r.seconds for r in records), 4) if decide else None,
                     "split": {k: round(v, 3) for k, v in time_split(result.stats).items()}})
        log(f"{label:50} {wall:7.1f} s  {tokens / wall:7.1f} tok/s  ({tokens} tokens)")
    plain = next(r for r in rows if r["policy"] == "plain")
    best_static_row = max((r for r in rows if r["policy"].startswith("static")), key=lambda r: r["tok_s"])
    for r in rows:
        r["speedup_vs_plain"] = round(r["tok_s"] / plain["tok_s"], 2)
        r["vs_best_static"] = round(r["tok_s"] / best_static_row["tok_s"], 2)
    lengths = sorted(len(o.token_ids) for o in outs)
    result = {"machine": machine(), "model": cfg.model, "dtype": str(policy.dtype).removeprefix("torch."), "draft": str(draft_path), "prompts": cfg.prompts, "samples": cfg.samples,
              "max_new_tokens": cfg.max_new_tokens, "response_lengths": {"median": lengths[len(lengths) // 2], "max": lengths[-1]},
              "rows": rows, "workloads": workloads}
    write_json(json_path, result)
    # The table is printed always; it goes into benchmarks/RESULTS.md only with record.
    results = results_file(record)
    from rlhfspec.bench.plots import realloc_timeline, rollout_timeline

    shown = {k: v for k, v in traces.items() if k in ("plain", "adaptive")}
    on = "" if cfg.device == "cpu" else f"_{cfg.device}"
    if multi:
        png = realloc_timeline(shown, cfg.instances, results.parent / f"rollout_timeline_k{cfg.instances}.png")
    else:
        png = rollout_timeline(shown, results.parent / f"rollout_timeline{'_eagle' if cfg.eagle else ''}{on}.png")
    section = ("rollout" if not multi else f"rollout-k{cfg.instances}") + ("-eagle" if cfg.eagle else "") + on.replace("_", "-")
    log(write_section(section, _markdown(result, cfg, png.name, json_path), path=results))
    return result


def policies(cfg: RolloutBenchConfig) -> dict:
    """The drafting policies compared, by label: plain (None), the statics, threshold, adaptive."""
    best_static = max(cfg.statics, key=lambda s: s[1])
    out: dict = {"plain": None}
    for name, n in cfg.statics:
        out[f"static {name} n={n}"] = Static(name, n)
    out[f"threshold {best_static[0]} n={best_static[1]} (off while B > {cfg.threshold_batch})"] = Threshold(*best_static, cfg.threshold_batch)
    out["adaptive"] = Adaptive()
    return out


def workload_trace(prompts: list[list[int]], outputs, records) -> dict:
    """What a run generated, without any of its timings: prompt and response lengths in the order
    the samples were handed out, which samples share a prompt, and the drafts' per-position
    acceptance (what `bench sim-validate` feeds the simulator)."""
    from rlhfspec.sim.workload import AcceptanceProfile

    return {"prompt_lens": [len(p) for p in prompts], "lengths": [len(o.token_ids) for o in outputs],
            "prompt_ids": first_with_prompt(prompts), "acceptance": AcceptanceProfile.from_records(records).rates}


def _markdown(result: dict, cfg: RolloutBenchConfig, png: str, json_path: str | None = None) -> str:
    lines = [
        "## GRPO-style rollout: drafting policies" + (" (with the eagle head, chains and trees)" if cfg.eagle else "")
        + ("" if cfg.device == "cpu" else f" on {cfg.device}"),
        "",
        f"Command: `rlhfspec bench rollout{' --quick' if cfg.quick else ''}{' --eagle' if cfg.eagle else ''}"
        f"{'' if cfg.device == 'cpu' else f' --device {cfg.device}'} --record{f' --json {json_path}' if json_path else ''}`  ",
        f"Machine: {result['machine']}; policy {result['model']} ({result['dtype']}), draft `{result['draft']}`  ",
        f"{cfg.prompts} held-out RL-style prompts (none the drafters were trained on) x {cfg.samples} samples at temperature 1, up to {cfg.max_new_tokens} new tokens "
        f"(response length median {result['response_lengths']['median']}, max {result['response_lengths']['max']}), "
        f"{cfg.batch_size} live samples at most, one run per policy"
        + (f" on {cfg.instances} {cfg.backend} instances, reallocation {'on' if cfg.realloc else 'off'}." if cfg.instances > 1 or cfg.backend == "ray"
           else " in one process."),
        "",
        "| policy | wall s | tokens | tok/s | speedup vs plain | vs best static | acceptance | selector ms/step (median) | selector share of step time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        decide = "-" if r.get("decide_ms") is None else f"{r['decide_ms']:.3f}"
        share = "-" if r.get("decide_share") is None else f"{r['decide_share']:.2%}"
        lines.append(f"| {r['policy']} | {r['wall_s']} | {r['tokens']} | {r['tok_s']} | {r['speedup_vs_plain']:.2f} | {r['vs_best_static']:.2f} | {acc} | {decide} | {share} |")
    lines += ["", f"![rollout timeline]({png})"]
    return "\n".join(lines)
