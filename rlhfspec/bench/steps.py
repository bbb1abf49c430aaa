"""`rlhfspec bench steps`: the engine's measured step-time table T(B, q) for named architectures
with random weights (step times do not depend on the values), on the CPU or a CUDA GPU. It is
the hardware profile the selector's cost model and the simulator read; `benchmarks/gpu.sh`
runs it on a GPU. With --placement it also checks, on that device, whether a sample's logits
are bitwise the same alone and batched (with and without the batch-invariant forward)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlhfspec.bench.common import machine, results_file, write_json, write_section
from rlhfspec.engine.profile import forward_times
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.catalog import random_model
from rlhfspec.models.kv_cache import KVCache
from rlhfspec.models.loader import resolve_dtype


@dataclass
class StepsConfig:
    models: tuple[str, ...] = ("smollm2-135m",)
    device: str = "cpu"
    dtype: str | None = None  # None: the device's generation default
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    qs: tuple[int, ...] = (1, 2, 3, 5, 9)
    context: int = 512
    repeats: int = 5
    budget_s: float = 90.0  # per model; the batch grid stops growing once spent
    invariant: bool = False  # time the batch-invariant forward instead of the fast one
    placement: bool = False


def run(cfg: StepsConfig, json_path: str | None = None, log=print) -> dict:
    dtype = resolve_dtype(cfg.dtype, cfg.device)
    result = {"machine": machine(), "device": cfg.device, "dtype": str(dtype).removeprefix("torch."), "context": cfg.context,
              "invariant": cfg.invariant, "models": {}}
    for name in cfg.models:
        start = time.perf_counter()
        model = random_model(name, dtype, cfg.device)
        c = model.config
        entry = {
            "params": c.num_params, "weight_bytes": c.num_params * dtype.itemsize,
            "kv_bytes_per_token": 2 * c.num_layers * c.num_kv_heads * c.head_dim * dtype.itemsize,
        }
        table = forward_times(model, cfg.batches, cfg.qs, cfg.context, cfg.budget_s, invariant=cfg.invariant, repeats=cfg.repeats)
        entry["table"] = [[b, q, round(t, 6)] for (b, q), t in sorted(table.items())]
        if cfg.placement:
            entry["placement"] = {}
            for inv in (False, True):
                try:
                    entry["placement"][str(inv)] = placement_check(model, inv)
                except RlhfspecError as e:  # no verified invariant kernels on this device
                    entry["placement"][str(inv)] = {"bitwise": None, "error": str(e)}
        result["models"][name] = entry
        log(_summary(name, entry, time.perf_counter() - start))
        del model
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
    write_json(json_path, result)
    return result


def render(paths: list[str], record: bool = False, log=print) -> None:
    """The markdown section of step-time tables already measured (e.g. by benchmarks/gpu.sh on a GPU)."""
    import json
    from pathlib import Path

    results = [json.loads(Path(p).read_text()) for p in paths]
    first = results[0]
    lines = [
        f"## Engine step times on {first['device']} (random weights of catalogued architectures)", "",
        f"Measured by `bash benchmarks/gpu.sh` ({', '.join(paths)}); rendered by `rlhfspec bench steps --from-json "
        f"{' '.join(paths)}{' --record' if record else ''}`  ",
        f"Machine: {first['machine']}; {first['dtype']}, batch-invariant forward: {'on' if first['invariant'] else 'off'}; "
        f"context {first['context']} tokens per row; median of 5 forwards after a warm-up.", "",
        "Decode step (one new token per row), ms, and what reading the weights once would take at the device's bandwidth:", "",
    ]
    batches = sorted({b for r in results for e in r["models"].values() for b, _, _ in e["table"]})
    lines += ["| model | params | " + " | ".join(f"B={b}" for b in batches) + " | weights / 3.35 TB/s |",
              "|---|---:|" + "---:|" * len(batches) + "---:|"]
    for r in results:
        for name, e in r["models"].items():
            t = {(b, q): x for b, q, x in e["table"]}
            cells = [f"{t[(b, 1)] * 1e3:.1f}" if (b, 1) in t else "" for b in batches]
            lines.append(f"| {name} | {e['params'] / 1e9:.2f}B | " + " | ".join(cells) + f" | {e['weight_bytes'] / 3.35e12 * 1e3:.1f} |")
    lines += ["", "Verifying n drafts (1 + n new tokens per row) relative to a decode step, batch 64:", "",
              "| model | n=1 | n=2 | n=4 | n=8 | n=32 |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for name, e in r["models"].items():
            t = {(b, q): x for b, q, x in e["table"]}
            if (64, 1) in t:
                lines.append(f"| {name} | " + " | ".join(f"{t[(64, q)] / t[(64, 1)]:.2f}x" if (64, q) in t else "" for q in (2, 3, 5, 9, 33)) + " |")
    log(write_section(f"steps-{first['device']}", "\n".join(lines), path=results_file(record)))


def placement_check(model, invariant: bool, companions: int = 15, steps: int = 8) -> dict:
    """One sample's logits alone vs batched with `companions` others of other lengths, over a
    prefill and `steps` decode steps: whether bitwise equal, and the largest difference."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    target = torch.randint(3, vocab, (41 + steps,), generator=gen).tolist()
    others = [torch.randint(3, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(5, 200, (companions,), generator=gen)]
    runs = []
    for batch in ([], others):
        cache = KVCache(model.config, 1 + len(batch), 256, model.dtype, model.device, invariant=invariant)
        model.ensure_positions(256)
        feeds = {0: target[:40], **{i + 1: p for i, p in enumerate(batch)}}
        rows = []
        with torch.inference_mode():
            for k in range(steps + 1):
                slots = list(feeds)
                att = cache.attend(slots, [len(feeds[s]) for s in slots])
                flat = torch.tensor([t for s in slots for t in feeds[s]], device=model.device)
                logits = model.logits(model(flat, att.positions, att), invariant)
                cache.advance(slots, [len(feeds[s]) for s in slots])
                rows.append(logits[len(feeds[0]) - 1].float().cpu())
                feeds = {s: [target[40 + k]] if s == 0 else [int(torch.randint(3, vocab, (1,), generator=gen))] for s in slots}
        runs.append(torch.stack(rows))
    return {"bitwise": bool(torch.equal(*runs)), "max_abs_diff": float((runs[0] - runs[1]).abs().max())}


def _summary(name: str, entry: dict, seconds: float) -> str:
    decode = {b: t for b, q, t in entry["table"] if q == 1}
    parts = ", ".join(f"B={b}: {t * 1e3:.2f} ms ({b / t:.0f} tok/s)" for b, t in decode.items())
    line = f"{name} ({entry['params'] / 1e9:.2f}B, {seconds:.0f} s): decode step {parts}"
    if "placement" in entry:
        checks = []
        for k, v in entry["placement"].items():
            verdict = "unavailable" if v["bitwise"] is None else "bitwise" if v["bitwise"] else "differs by %.2e" % v["max_abs_diff"]
            checks.append(("invariant " if k == "True" else "fast ") + verdict)
        line += "; alone vs batched: " + ", ".join(checks)
    return line
