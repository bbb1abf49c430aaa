"""`rlhfspec bench sim-calibrate`: the roofline's decode step time beside published measurements.

Each point is a decode step (time per output token) some serving engine measured and published,
with its source; the roofline predicts the same step (same GPU, model, tensor-parallel degree,
precision, concurrent sequences and context) from the spec sheet and its assumed efficiencies.
Nothing here is measured by rlhfspec: the right-hand figures are the sources' own.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfspec.bench.common import results_file, write_json, write_section
from rlhfspec.sim.hardware import Roofline, Shape, accelerator, model_config


@dataclass(frozen=True)
class Published:
    gpu: str
    model: str  # a catalog name of the same architecture
    tp: int
    batch: int  # concurrent sequences decoding
    context: int  # tokens in each sequence's cache, mid-generation (input + half the output)
    bytes_per_param: float
    ms_per_token: float  # the published time per output token (or 1000 / tokens per second at batch 1)
    engine: str
    source: str
    note: str = ""


POINTS = (
    Published("A100-40GB", "llama-3.1-8b", 1, 1, 1024 + 64, 2.0, 1000 / 75, "vLLM 0.23.0, bf16",
              "https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on",
              "about 75 tokens/s at concurrency 1, 1024 in / 128 out (the post reads it as 77% of the bandwidth ceiling)"),
    Published("H100", "llama-3.1-8b", 1, 1, 256, 2.0, 6.48, "vLLM 0.21.0, fp16",
              "https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/",
              "TPOT p50 at concurrency 1, chatbot-short prompts (context not stated; 256 assumed)"),
    Published("H100", "llama-3.1-8b", 1, 4, 256, 2.0, 6.59, "vLLM 0.21.0, fp16",
              "https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/", "TPOT p50 at concurrency 4"),
    Published("H100", "llama-3.1-8b", 1, 16, 256, 2.0, 10.94, "vLLM 0.21.0, fp16",
              "https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/",
              "TPOT p50 at concurrency 16; arriving requests' prefills share the steps, so above a pure decode step"),
    Published("H100", "llama-3.1-70b", 2, 1, 5000 + 250, 1.0, 18.58, "NVIDIA NIM 1.8.0 (Llama-3.3-70B-Instruct), fp8",
              "https://docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance.md",
              "ITL at concurrency 1, 5000 in / 500 out, TP2; KV cache precision not stated (fp8 assumed)"),
    Published("H100", "llama-3.1-70b", 2, 5, 5000 + 250, 1.0, 21.83, "NVIDIA NIM 1.8.0 (Llama-3.3-70B-Instruct), fp8",
              "https://docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance.md", "ITL at concurrency 5"),
    Published("H100", "llama-3.1-70b", 2, 1, 500 + 1000, 1.0, 18.91, "NVIDIA NIM 1.8.0 (Llama-3.3-70B-Instruct), fp8",
              "https://docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance.md", "ITL at concurrency 1, 500 in / 2000 out"),
)


def predict(p: Published, overhead_ms: float = 1.5) -> float:
    """The roofline's milliseconds for the published decode step."""
    roof = Roofline(accelerator(p.gpu), Shape.of(model_config(p.model), p.bytes_per_param), p.tp, overhead_s=overhead_ms * 1e-3)
    return 1e3 * roof.forward(p.batch, 1, p.context)


def run(json_path: str | None = None, record: bool = False, overhead_ms: float = 1.5, log=print) -> dict:
    rows = []
    for p in POINTS:
        ms = predict(p, overhead_ms)
        rows.append({**p.__dict__, "roofline_ms": round(ms, 2), "ratio": round(ms / p.ms_per_token, 3), "ms_per_token": round(p.ms_per_token, 2)})
    result = {"overhead_ms": overhead_ms, "rows": rows}
    write_json(json_path, result)
    lines = [
        "## Roofline vs published decode step times (calibration of the simulator's GPU cost model)", "",
        f"Command: `rlhfspec bench sim-calibrate{' --record' if record else ''}`  ",
        "The published figures are the sources' own measurements (none is rlhfspec's); the roofline uses the spec sheet, "
        f"bandwidth efficiency {Roofline.mem_eff}, FLOP efficiency {Roofline.flop_eff} and {overhead_ms:g} ms per step "
        "(assumptions of the model, not fitted to these rows).", "",
        "| GPU | model (architecture) | TP | seqs | context | bytes/param | engine | published ms/token | roofline ms | roofline / published | source |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['gpu']} | {r['model']} | {r['tp']} | {r['batch']} | {r['context']} | {r['bytes_per_param']:g} | {r['engine']} | "
                     f"{r['ms_per_token']:.2f} | {r['roofline_ms']:.2f} | {r['ratio']:.2f} | [{r['note']}]({r['source']}) |")
    log(write_section("sim-calibrate", "\n".join(lines), path=results_file(record)))
    return result
