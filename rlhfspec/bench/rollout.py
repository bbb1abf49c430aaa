"""`rlhfspec bench rollout`: a GRPO-style rollout under different drafting policies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhfspec.bench.common import machine, timed, results_file, write_json, write_section
from rlhfspec.bench.spec import default_draft_path
from rlhfspec.data.chat import encode_prompt
from rlhfspec.data.tasks import rl_style_prompts
from rlhfspec.engine.drafters import DraftModelDrafter, NgramDrafter
from rlhfspec.engine.generate import adaptive_strategy, generate
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.models.loader import load_model
from rlhfspec.strategy.base import StaticStrategy
from rlhfspec.strategy.selector import ThresholdStrategy


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

    @classmethod
    def make_quick(cls, **kw) -> RolloutBenchConfig:
        return cls(prompts=4, samples=4, max_new_tokens=96, statics=(("ngram", 2), ("draft", 2)), quick=True, **kw)


def run(cfg: RolloutBenchConfig, json_path: str | None = None, record: bool = False, log=print) -> dict:
    policy, tok = load_model(cfg.model)
    draft_path = Path(cfg.draft) if cfg.draft else default_draft_path()
    loaded = DraftModelDrafter.load(draft_path, policy, policy_tokenizer=tok)
    vocab = None if loaded.vocab is None else loaded.vocab.tolist()
    texts = rl_style_prompts(cfg.prompts, seed=cfg.seed)
    prompts = [encode_prompt(tok, t) for t in texts for _ in range(cfg.samples)]
    params = SamplingParams(temperature=1.0, max_new_tokens=cfg.max_new_tokens)

    def drafters():
        return [NgramDrafter(), DraftModelDrafter(loaded.model, draft_vocab=vocab)]

    best_static = max(cfg.statics, key=lambda s: s[1])
    # label -> (strategy for one in-process instance, the same as an InstanceSpec strategy string)
    policies = {"plain": (lambda ds: None, None)}
    for name, n in cfg.statics:
        policies[f"static {name} n={n}"] = (lambda ds, name=name, n=n: StaticStrategy(name, n), f"static:{name}:{n}")
    policies[f"threshold {best_static[0]} n={best_static[1]} (off while B > {cfg.threshold_batch})"] = (
        lambda ds: ThresholdStrategy(best_static[0], best_static[1], cfg.threshold_batch),
        f"threshold:{best_static[0]}:{best_static[1]}:{cfg.threshold_batch}")
    policies["adaptive"] = (lambda ds: adaptive_strategy(policy, ds), "adaptive")
    generate(policy, prompts[:2], SamplingParams(max_new_tokens=8), tokenizer=tok, drafter=drafters(), num_draft_tokens=2)  # warm-up
    rows, traces = [], {}
    multi = cfg.instances > 1 or cfg.backend == "ray"
    for label, (make, spec_strategy) in policies.items():
        outs: list = []
        if multi:
            wall, traces[label] = _run_multi(cfg, spec_strategy, policy, tok, prompts, params, draft_path, outs)
            acceptance = None
        else:
            ds = drafters()
            strategy = make(ds)
            stats: list = []
            wall = timed(lambda: outs.extend(generate(policy, prompts, params, seed=cfg.seed, tokenizer=tok, batch_size=cfg.batch_size,
                                                      drafter=ds if strategy is not None else None, strategy=strategy, instance_stats=stats)))
            acceptance, traces[label] = stats[0].acceptance, stats[0].records
        tokens = sum(len(o.token_ids) for o in outs)
        rows.append({"policy": label, "wall_s": round(wall, 2), "tokens": tokens, "tok_s": round(tokens / wall, 1),
                     "acceptance": None if acceptance is None else round(acceptance, 3)})
        log(f"{label:50} {wall:7.1f} s  {tokens / wall:7.1f} tok/s  ({tokens} tokens)")
    plain = next(r for r in rows if r["policy"] == "plain")
    best_static_row = max((r for r in rows if r["policy"].startswith("static")), key=lambda r: r["tok_s"])
    for r in rows:
        r["speedup_vs_plain"] = round(r["tok_s"] / plain["tok_s"], 2)
        r["vs_best_static"] = round(r["tok_s"] / best_static_row["tok_s"], 2)
    lengths = sorted(len(o.token_ids) for o in outs)
    result = {"machine": machine(), "model": cfg.model, "draft": str(draft_path), "prompts": cfg.prompts, "samples": cfg.samples,
              "max_new_tokens": cfg.max_new_tokens, "response_lengths": {"median": lengths[len(lengths) // 2], "max": lengths[-1]},
              "rows": rows}
    write_json(json_path, result)
    # The table is printed always; it goes into benchmarks/RESULTS.md only with record.
    results = results_file(record)
    from rlhfspec.bench.plots import realloc_timeline, rollout_timeline

    shown = {k: v for k, v in traces.items() if k in ("plain", "adaptive")}
    if multi:
        png = realloc_timeline(shown, cfg.instances, results.parent / f"rollout_timeline_k{cfg.instances}.png")
    else:
        png = rollout_timeline(shown, results.parent / "rollout_timeline.png")
    log(write_section("rollout" if not multi else f"rollout-k{cfg.instances}", _markdown(result, cfg, png.name), path=results))
    return result


def _run_multi(cfg: RolloutBenchConfig, strategy: str | None, policy, tok, prompts, params, draft_path, outs: list):
    """One policy over cfg.instances instances; returns (wall seconds, the coordinator's timeline)."""
    from rlhfspec.rollout.multi import MultiConfig, generate_multi, instance_batch
    from rlhfspec.rollout.spec import InstanceSpec

    drafters = [] if strategy is None else ["ngram", str(draft_path)]
    spec = InstanceSpec(cfg.model, max_batch=instance_batch(len(prompts), cfg.instances, cfg.batch_size), max_len=max(map(len, prompts)) + cfg.max_new_tokens,
                        drafters=drafters, strategy=strategy)
    mcfg = MultiConfig(instances=cfg.instances, backend=cfg.backend, realloc=cfg.realloc, ray_address=cfg.ray_address)
    result: list = []
    wall = timed(lambda: result.extend(generate_multi(spec, prompts, params, cfg.seed, mcfg, model=policy, tokenizer=tok)))
    outs.extend(result[0])
    return wall, result[1].timeline


def _markdown(result: dict, cfg: RolloutBenchConfig, png: str) -> str:
    lines = [
        "## GRPO-style rollout: drafting policies",
        "",
        f"Command: `rlhfspec bench rollout{' --quick' if cfg.quick else ''}`  ",
        f"Machine: {result['machine']}; policy {result['model']}, draft `{result['draft']}`  ",
        f"{cfg.prompts} RL-style prompts x {cfg.samples} samples at temperature 1, up to {cfg.max_new_tokens} new tokens "
        f"(response length median {result['response_lengths']['median']}, max {result['response_lengths']['max']}), "
        f"{cfg.batch_size} live samples at most, one run per policy"
        + (f" on {cfg.instances} {cfg.backend} instances, reallocation {'on' if cfg.realloc else 'off'}." if cfg.instances > 1 or cfg.backend == "ray"
           else " in one process."),
        "",
        "| policy | wall s | tokens | tok/s | speedup vs plain | vs best static | acceptance |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        lines.append(f"| {r['policy']} | {r['wall_s']} | {r['tokens']} | {r['tok_s']} | {r['speedup_vs_plain']:.2f} | {r['vs_best_static']:.2f} | {acc} |")
    lines += ["", f"![rollout timeline]({png})"]
    return "\n".join(lines)
