"""`rlhfspec bench spec`: static speculative settings against plain decoding of the same engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfspec.bench.common import machine, median, timed, results_file, write_json, write_section
from rlhfspec.bench.plots import speedup_vs_n
from rlhfspec.data.chat import encode_prompt
from rlhfspec.data.tasks import rl_style_prompts
from rlhfspec.engine.drafters import DraftModelDrafter, EagleDrafter, NgramDrafter
from rlhfspec.engine.profile import invariant_for
from rlhfspec.rollout.generate import generate
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.kv_cache import KVCache
from rlhfspec.models.loader import load_model
from rlhfspec.paths import default_draft_path, default_eagle_path

MIN_PROMPTS = 8

def ensure_default_draft(policy, tokenizer, log=print) -> Path:
    """The distilled default draft, distilled first (about 13 minutes) if it is not cached yet."""
    path = default_draft_path()
    if not (path / "model.safetensors").is_file():
        from rlhfspec.distill.run import DistillJob, distill_draft

        log(f"no distilled draft at {path}; distilling one now (rlhfspec distill-draft --draft-vocab 8192 --out {path})")
        distill_draft(policy, tokenizer, path, DistillJob(draft_vocab=8192), log=log)
    return path


def ensure_default_eagle(policy, tokenizer, log=print) -> Path:
    """The default eagle head, trained first (about 12 minutes) if it is not cached yet."""
    path = default_eagle_path()
    if not (path / "model.safetensors").is_file():
        from rlhfspec.distill.run import EagleJob, distill_eagle

        log(f"no eagle head at {path}; training one now (rlhfspec distill-draft --kind eagle --out {path})")
        distill_eagle(policy, tokenizer, path, EagleJob(), log=log)
    return path


@dataclass
class SpecBenchConfig:
    model: str = "default"
    draft: str | None = None
    eagle: str | None = None
    drafters: tuple[str, ...] = ("ngram", "draft")
    batches: tuple[int, ...] = (1, 4, 16, 64)
    ns: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    temperatures: tuple[float, ...] = (0.0, 1.0)
    max_new_tokens: int = 64
    repeats: int = 1
    seed: int = 123
    quick: bool = False
    verify_batches: tuple[int, ...] = (1, 4, 16, 64)
    verify_ks: tuple[int, ...] = (1, 2, 4, 8)
    device: str = "cpu"  # cuda: the policy in bfloat16 on the GPU, the fast (not batch-invariant) forward
    # heldout: RL-style prompts none of the default drafters was trained on; train: the ones they were
    # (what this bench measured before 2026-11-29)
    prompts: str = "heldout"

    def __post_init__(self):
        if self.prompts not in ("heldout", "train"):
            raise RlhfspecError(f"bench spec --prompts must be heldout or train, got {self.prompts!r}.")

    @classmethod
    def make_quick(cls, **kw) -> SpecBenchConfig:
        return cls(**(dict(batches=(1, 16), ns=(1, 2, 4, 8), max_new_tokens=32, quick=True, verify_batches=(1, 16)) | kw))

    def command(self, json_path: str | None = None, record: bool = False) -> str:
        """The `rlhfspec bench spec` command line that makes this config (and writes its JSON)."""
        base = SpecBenchConfig.make_quick() if self.quick else SpecBenchConfig()
        parts = ["rlhfspec bench spec"] + (["--quick"] if self.quick else []) + ([f"--device {self.device}"] if self.device != "cpu" else [])
        if self.drafters != SpecBenchConfig.drafters:
            parts.append("--drafters " + ",".join(self.drafters))
        for name in ("batches", "ns", "temperatures"):
            if getattr(self, name) != getattr(base, name):
                parts.append(f"--{name} " + ",".join(f"{x:g}" for x in getattr(self, name)))
        parts += ([f"--prompts {self.prompts}"] if self.prompts != "heldout" else [])
        parts += ([f"--json {json_path}"] if json_path else []) + (["--record"] if record else [])
        return " ".join(parts)


def verify_cost(model, batches, ks, context: int = 128, repeats: int = 5) -> list[dict]:
    """Time of one forward of k new tokens per row over a `context`-token cache, relative to k = 1."""
    rows = []
    invariant = invariant_for(model.device)
    for b in batches:
        cache = KVCache(model.config, b, context + max(ks) + 1, model.dtype, model.device, invariant)
        model.ensure_positions(context + max(ks) + 1)
        slots = list(range(b))
        with torch.inference_mode():
            cache.forward(model, slots, torch.randint(0, 1000, (b, context)).tolist())
            base = None
            for k in ks:
                def run():
                    model.logits(cache.forward(model, slots, torch.randint(0, 1000, (b, k)).tolist(), last_only=False, advance=False), cache.invariant)
                run()
                t = median([timed(run, model.device.type) for _ in range(repeats)])
                base = base or t
                rows.append({"batch": b, "k": k, "seconds": round(t, 4), "relative": round(t / base, 2)})
    return rows


def run(cfg: SpecBenchConfig, json_path: str | None = None, record: bool = False, log=print) -> dict:
    policy, tok = load_model(cfg.model, device=cfg.device)
    invariant = invariant_for(cfg.device)
    # Loaded once, outside the timing; each measurement gets a fresh drafter over the same weights.
    drafters, draft_path, eagle_path = {}, None, None
    for name in cfg.drafters:
        if name == "ngram":
            drafters[name] = NgramDrafter
        elif name == "draft":
            draft_path = Path(cfg.draft) if cfg.draft else ensure_default_draft(policy, tok, log)
            loaded = DraftModelDrafter.load(draft_path, policy, policy_tokenizer=tok)
            vocab = None if loaded.vocab is None else loaded.vocab.tolist()
            drafters[name] = lambda model=loaded.model, vocab=vocab: DraftModelDrafter(model, draft_vocab=vocab)
        elif name == "eagle" or name.startswith("eagle-tree"):
            branches = 1 if name == "eagle" else _tree_branches(name)
            eagle_path = Path(cfg.eagle) if cfg.eagle else ensure_default_eagle(policy, tok, log)
            head = EagleDrafter.load(eagle_path, policy).head
            drafters[name] = lambda head=head, k=branches: EagleDrafter(head, branches=k)
        else:
            raise RlhfspecError(f"bench spec drafter {name!r} is not ngram, draft, eagle or eagle-treeK (K chains per tree).")
    prompts = [encode_prompt(tok, p) for p in rl_style_prompts(max(max(cfg.batches), MIN_PROMPTS), seed=cfg.seed,
                                                         heldout=cfg.prompts == "heldout")]
    for name in drafters:  # warm-up: weight packing, allocator
        generate(policy, prompts[:2], SamplingParams(max_new_tokens=8), tokenizer=tok, drafter=drafters[name](), num_draft_tokens=2,
                 batch_invariant=invariant)
    rows = []
    for temp in cfg.temperatures:
        params = SamplingParams(temperature=temp, max_new_tokens=cfg.max_new_tokens)
        for batch in cfg.batches:
            # At least MIN_PROMPTS prompts, `batch` of them live at once, so small batches measure
            # more than one short answer.
            batch_prompts = prompts[: max(batch, MIN_PROMPTS)]

            def measure(drafter=None, n=None):
                times, tokens, stats = [], 0, []
                for r in range(cfg.repeats):
                    outs: list = []
                    times.append(timed(lambda: outs.extend(generate(
                        policy, batch_prompts, params, seed=cfg.seed + r, tokenizer=tok, batch_size=batch,
                        drafter=None if drafter is None else drafters[drafter](), num_draft_tokens=n, instance_stats=stats,
                        batch_invariant=invariant)), cfg.device))
                    tokens = sum(len(o.token_ids) for o in outs)
                return tokens / median(times), stats[-1]

            plain, _ = measure()
            for name in drafters:
                for n in cfg.ns:
                    tok_s, st = measure(name, n)
                    rows.append({
                        "drafter": name, "n": n, "batch": batch, "temperature": temp, "tok_s": round(tok_s, 1),
                        "plain_tok_s": round(plain, 1), "speedup": round(tok_s / plain, 2),
                        "acceptance": None if st.acceptance is None else round(st.acceptance, 3),
                        "tokens_per_step": round(st.tokens_per_step, 2),
                    })
                    log(_fmt(rows[-1]))
    result = {"machine": machine(), "json": json_path, "recorded": record, "model": cfg.model, "draft": str(draft_path), "eagle": str(eagle_path), "dtype": str(policy.dtype).removeprefix("torch."),
              "rows": rows, "verify_cost": verify_cost(policy, cfg.verify_batches, cfg.verify_ks)}
    write_json(json_path, result)
    # The table is printed always; it goes into benchmarks/RESULTS.md only with record.
    results = results_file(record)
    # The default drafters' table is the "spec" section; other selections get their own section
    # and plot, so a run over one new drafter does not replace the others' table.
    suffix = (("" if cfg.drafters == SpecBenchConfig.drafters else "_" + "_".join(cfg.drafters)) + ("" if cfg.device == "cpu" else f"_{cfg.device}")
              + ("" if cfg.prompts == "heldout" else "_train_prompts"))
    png = speedup_vs_n(rows, results.parent / f"spec_speedup{suffix}.png")
    log(write_section("spec" + suffix.replace("_", "-"), _markdown(result, cfg, png.name), path=results))
    return result


def _acceptance_n(cfg: SpecBenchConfig) -> int:
    """The draft length whose acceptance the table shows: 4 if measured, else the shortest."""
    return 4 if 4 in cfg.ns else min(cfg.ns)


def _tree_branches(name: str) -> int:
    """K of "eagle-treeK" (the default tree width for a bare "eagle-tree")."""
    from rlhfspec.engine.spec import TREE_BRANCHES

    rest = name.removeprefix("eagle-tree")
    if rest == "":
        return TREE_BRANCHES
    if not rest.isdigit() or int(rest) < 1:
        raise RlhfspecError(f"bench spec drafter {name!r}: write eagle-treeK with K chains per tree, e.g. eagle-tree3.")
    return int(rest)


def _fmt(r: dict) -> str:
    acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
    return (f"{r['drafter']:5} n={r['n']} batch {r['batch']:2} T={r['temperature']:g}: {r['tok_s']:6.1f} tok/s vs plain "
            f"{r['plain_tok_s']:6.1f} -> {r['speedup']:.2f}x (acceptance {acc}, {r['tokens_per_step']:.2f} tok/step)")


def _markdown(result: dict, cfg: SpecBenchConfig, png: str) -> str:
    rows = result["rows"]
    lines = [
        "## Speculative decoding: static settings vs plain decoding"
        + ("" if cfg.drafters == SpecBenchConfig.drafters else f" ({', '.join(cfg.drafters)})")
        + ("" if cfg.device == "cpu" else f" on {cfg.device}") + ("" if cfg.prompts == "heldout" else ", on the drafters' training prompts"),
        "",
        f"Command: `{cfg.command(result.get('json'), result.get('recorded', False))}`  ",
        f"Machine: {result['machine']}; policy {result['model']} ({result['dtype']})"
        + (f", draft `{result['draft']}`" if "draft" in cfg.drafters else "")
        + (f", eagle head `{result['eagle']}`" if any(d.startswith("eagle") for d in cfg.drafters) else "") + "  ",
        f"{'Held-out RL-style prompts (none the drafters were trained on' if cfg.prompts == 'heldout' else 'RL-style prompts (those the drafters were trained on'}: "
        f"arithmetic, short reasoning, code; max(batch, {MIN_PROMPTS}) of them, `batch` live at once), up to "
        f"{cfg.max_new_tokens} new tokens, stopping at EOS; speedup = tokens/s over plain decoding of the same engine "
        f"measured in the same loop; acceptance = accepted / proposed draft tokens (for eagle-treeK, K chains of n share "
        f"their first position and one forward verifies all K*n drafts; acceptance counts along the accepted chain).",
        "",
        f"![speedup vs n]({png})",
        "",
        "| drafter | T | batch | " + " | ".join(f"n={n}" for n in cfg.ns) + f" | acceptance (n={_acceptance_n(cfg)}) |",
        "|---|---:|---:|" + "---:|" * len(cfg.ns) + "---:|",
    ]
    for key in sorted({(r["drafter"], r["temperature"], r["batch"]) for r in rows}):
        cells = {r["n"]: r for r in rows if (r["drafter"], r["temperature"], r["batch"]) == key}
        acc = cells[_acceptance_n(cfg)]["acceptance"]
        lines.append(f"| {key[0]} | {key[1]:g} | {key[2]} | " + " | ".join(f"{cells[n]['speedup']:.2f}" for n in cfg.ns)
                     + f" | {'-' if acc is None else f'{acc:.0%}'} |")
    best = {}
    for r in rows:
        k = (r["temperature"], r["batch"])
        if k not in best or r["speedup"] > best[k]["speedup"]:
            best[k] = r
    lines += ["", "Best static setting per (temperature, batch):", "", "| T | batch | drafter | n | speedup | plain tok/s |", "|---:|---:|---|---:|---:|---:|"]
    for (t, b), r in sorted(best.items()):
        lines.append(f"| {t:g} | {b} | {r['drafter']} | {r['n']} | {r['speedup']:.2f} | {r['plain_tok_s']} |")
    lines += ["", "Verification cost: one forward of k new tokens per row over a 128-token cache, relative to k = 1:", "",
              "| batch | " + " | ".join(f"k={k}" for k in cfg.verify_ks) + " |", "|---:|" + "---:|" * len(cfg.verify_ks)]
    for b in cfg.verify_batches:
        cells = {r["k"]: r for r in result["verify_cost"] if r["batch"] == b}
        lines.append(f"| {b} | " + " | ".join(f"{cells[k]['relative']:.2f}x ({cells[k]['seconds'] * 1000:.0f} ms)" for k in cfg.verify_ks) + " |")
    return "\n".join(lines)
