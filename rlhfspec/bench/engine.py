"""`rlhfspec bench engine`: our engine against transformers' `generate`, same model, prompts and settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfspec.bench.common import machine, median, memory_read_bandwidth, timed, results_file, write_json, write_section
from rlhfspec.data.chat import encode_prompt
from rlhfspec.data.prompts import BENCH_PROMPTS
from rlhfspec.rollout.generate import generate
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.models.invariant_attention import attention_layout
from rlhfspec.models.linear import choose
from rlhfspec.models.loader import _cached_default, default_cache_dir, load_model


@dataclass
class EngineBenchConfig:
    model: str = "default"
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    batches: tuple[int, ...] = (1, 16, 64)
    max_new_tokens: int = 64
    ragged_prompts: int = 64
    ragged_max_new_tokens: int = 256
    repeats: int = 3
    device: str = "cpu"

    @classmethod
    def quick(cls, **kw) -> EngineBenchConfig:
        return cls(batches=(1, 16), max_new_tokens=16, ragged_prompts=16, ragged_max_new_tokens=64, **kw)


def hf_model(source: str, dtype: torch.dtype, device: str):
    """transformers' own implementation of the same checkpoint."""
    from transformers import AutoModelForCausalLM

    path = _cached_default(default_cache_dir()) if source == "default" else Path(source)
    if path.is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, eos: bool, pad_id: int, device: str) -> int:
    """Greedy transformers generate on a left-padded batch; returns the useful tokens produced."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    eos_id = model.generation_config.eos_token_id if eos else None
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos_id, pad_token_id=pad_id, temperature=None, top_p=None, top_k=None,
        )[:, width:]
    if not eos:
        return out.numel()
    eos_ids = set(eos_id if isinstance(eos_id, list) else [eos_id])
    useful = 0
    for row in out.tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        useful += n
    return useful


def run(cfg: EngineBenchConfig, json_path: str | None = None, record: bool = False, log=print) -> dict:
    rows, kernels = [], {}
    bandwidth = memory_read_bandwidth() if cfg.device == "cpu" else None
    for dtype_name in cfg.dtypes:
        ours, tok = load_model(cfg.model, dtype=dtype_name, device=cfg.device)
        ref = hf_model(cfg.model, ours.dtype, cfg.device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        weight_bytes = ours.config.num_params * ours.dtype.itemsize
        encoded = [encode_prompt(tok, p) for p in BENCH_PROMPTS]
        fixed = SamplingParams(temperature=0, max_new_tokens=cfg.max_new_tokens, ignore_eos=True)
        # Warm all three (kernel choice and verification, weight packing, allocator) before timing.
        for invariant in (False, True):
            generate(ours, encoded[:2], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True), batch_invariant=invariant)
        hf_generate(ref, encoded[:2], 4, False, pad, cfg.device)
        kernels[dtype_name] = kernel_report(ours)
        for batch in cfg.batches:
            prompts = [encoded[i % len(encoded)] for i in range(batch)]
            t_ours, t_inv, t_hf = [], [], []
            for _ in range(cfg.repeats):
                t_ours.append(timed(lambda: generate(ours, prompts, fixed, batch_invariant=False), cfg.device))
                t_inv.append(timed(lambda: generate(ours, prompts, fixed, batch_invariant=True), cfg.device))
                t_hf.append(timed(lambda: hf_generate(ref, prompts, cfg.max_new_tokens, False, pad, cfg.device), cfg.device))
            tokens = batch * cfg.max_new_tokens
            ours_s, hf_s = median(t_ours), median(t_hf)
            roof = None
            if batch == 1 and bandwidth:
                roof = (weight_bytes / bandwidth) / (ours_s / cfg.max_new_tokens)
            rows.append(_row("fixed", dtype_name, batch, tokens / ours_s, tokens / median(t_inv), tokens / hf_s, roof))
            log(_fmt(rows[-1]))
        prompts = [encoded[i % len(encoded)] for i in range(cfg.ragged_prompts)]
        natural = SamplingParams(temperature=0, max_new_tokens=cfg.ragged_max_new_tokens)
        times: dict[str, list[float]] = {"ours": [], "inv": [], "hf": []}
        counts: dict[str, int] = {}
        for _ in range(cfg.repeats):
            for name, invariant in (("ours", False), ("inv", True)):
                outs: list = []
                times[name].append(timed(lambda: outs.extend(generate(ours, prompts, natural, batch_invariant=invariant)), cfg.device))
                counts[name] = sum(len(o.token_ids) for o in outs)
            box: list[int] = []
            times["hf"].append(timed(lambda: box.append(hf_generate(ref, prompts, cfg.ragged_max_new_tokens, True, pad, cfg.device)), cfg.device))
            counts["hf"] = box[0]
        rate = {k: counts[k] / median(v) for k, v in times.items()}
        rows.append(_row("ragged", dtype_name, cfg.ragged_prompts, rate["ours"], rate["inv"], rate["hf"], None))
        log(_fmt(rows[-1]))
        ours = ref = None  # free both models before the next dtype loads
    result = {
        "machine": machine(),
        "model": cfg.model,
        "device": cfg.device,
        "memory_read_gb_s": None if bandwidth is None else round(bandwidth / 1e9, 1),
        "kernels": kernels,
        "rows": rows,
    }
    write_json(json_path, result)
    # The table is printed always; it goes into benchmarks/RESULTS.md only with record.
    results = results_file(record)
    log(write_section(f"engine-{cfg.device}", _markdown(result, cfg, json_path, record), path=results))
    return result


def kernel_report(model) -> dict[str, str]:
    """Which kernel each projection shape got and its batch-invariant call sizes, and the
    invariant attention's layout, as verified on this machine."""
    out = {}
    for name, w, b in model.projection_weights():
        fast = choose(tuple(w.shape), b is not None, w.dtype, w.device, invariant=False)
        inv = choose(tuple(w.shape), b is not None, w.dtype, w.device, invariant=True)
        out[name] = f"{fast.kernel.name}, invariant {inv.kernel.name} in calls of {_sizes(inv.plan.sizes)} rows"
    cache_dtype = torch.float32 if model.dtype == torch.bfloat16 else model.dtype
    plan, step, block, serial = attention_layout(cache_dtype, model.device, model.config.head_dim)
    out["attention"] = (f"{_sizes(plan.sizes)} query rows per call, keys padded to a multiple of {step}, "
                        f"{block} keys per value product{', one thread' if serial else ''}")
    return out


def _sizes(sizes) -> str:
    """1..64, or the list where it has gaps."""
    sizes = list(sizes)
    return f"{sizes[0]}..{sizes[-1]}" if sizes == list(range(sizes[0], sizes[-1] + 1)) else ",".join(map(str, sizes))


def _row(case: str, dtype: str, batch: int, ours: float, invariant: float, hf: float, roof: float | None) -> dict:
    return {
        "case": case, "dtype": dtype, "batch": batch, "ours_tok_s": round(ours, 1), "invariant_tok_s": round(invariant, 1),
        "hf_tok_s": round(hf, 1), "ratio": round(ours / hf, 2), "invariant_ratio": round(invariant / hf, 2),
        "invariant_cost": round(ours / invariant, 3), "roofline_frac": None if roof is None else round(roof, 2),
    }


def _fmt(r: dict) -> str:
    roof = "" if r["roofline_frac"] is None else f"  roofline {r['roofline_frac']:.2f}"
    return (f"{r['case']:6} {r['dtype']:8} batch {r['batch']:3}: ours {r['ours_tok_s']:7.1f} tok/s  invariant {r['invariant_tok_s']:7.1f} tok/s  "
            f"transformers {r['hf_tok_s']:7.1f} tok/s  ratio {r['ratio']:.2f}  invariant costs {r['invariant_cost']:.2f}x{roof}")


def _markdown(result: dict, cfg: EngineBenchConfig, json_path: str | None = None, record: bool = False) -> str:
    lines = [
        f"## Engine vs transformers `generate` ({result['device']})",
        "",
        f"Command: `rlhfspec bench engine{' --device cuda' if cfg.device == 'cuda' else ''}"
        f"{' --quick' if cfg.max_new_tokens == EngineBenchConfig.quick().max_new_tokens else ''}"
        f"{f' --json {json_path}' if json_path else ''}{' --record' if record else ''}`  ",
        f"Machine: {result['machine']}; memory read bandwidth {result['memory_read_gb_s']} GB/s  ",
        f"Greedy, {cfg.max_new_tokens} new tokens per sample (EOS ignored) for the fixed rows; the ragged rows run "
        f"{cfg.ragged_prompts} prompts to EOS (cap {cfg.ragged_max_new_tokens}), counting tokens up to each EOS. "
        f"Median of {cfg.repeats} runs each, ours and transformers alternating in one process.",
        "",
        "Ours = the fast kernels (`batch_invariant=False`); invariant = the batch-invariant forward (the default); "
        "invariant cost = fast tok/s over invariant tok/s.",
        "",
        "| case | dtype | batch | ours tok/s | invariant tok/s | transformers tok/s | ratio | invariant ratio | invariant cost | roofline frac |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        roof = "" if r["roofline_frac"] is None else f"{r['roofline_frac']:.2f}"
        lines.append(f"| {r['case']} | {r['dtype']} | {r['batch']} | {r['ours_tok_s']} | {r['invariant_tok_s']} | {r['hf_tok_s']} "
                     f"| {r['ratio']:.2f} | {r['invariant_ratio']:.2f} | {r['invariant_cost']:.3f}x | {roof} |")
    ours = {(r["case"], r["dtype"], r["batch"]): r["ours_tok_s"] for r in result["rows"]}
    pairs = [(k[0], k[2], ours[k] / ours[("fixed" if k[0] == "fixed" else "ragged", "float32", k[2])])
             for k in ours if k[1] == "bfloat16" and (k[0], "float32", k[2]) in ours]
    if pairs:
        lines += ["", "Our bfloat16 throughput relative to our float32 (same run): "
                  + ", ".join(f"{case} batch {b}: {x:.2f}x" for case, b, x in pairs)]
    lines += ["", "Kernels this machine verified (projection: kernel and batch-invariant call sizes; attention: query rows per call, key padding, keys per value product):", ""]
    for dtype, report in result["kernels"].items():
        lines.append(f"- {dtype}: " + "; ".join(f"{k} {v}" for k, v in report.items()))
    return "\n".join(lines)
