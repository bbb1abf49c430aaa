"""Accelerators by name, models by name or config.json, and the analytic roofline of one forward.

The accelerator figures are the vendors' spec-sheet numbers (dense bf16 tensor throughput without
sparsity, HBM bandwidth, memory, NVLink bandwidth per GPU). The efficiencies and the per-step
overhead are assumptions of this model, not measurements: they are `Roofline` fields so a
calibration against measured decode throughput can set them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhfspec.errors import RlhfspecError
from rlhfspec.models.catalog import CATALOG, catalog_config
from rlhfspec.models.config import ModelConfig


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_flops: float  # dense, per second
    memory_bytes_per_second: float
    memory_bytes: float
    link_bytes_per_second: float  # NVLink, per GPU, one direction


# NVIDIA data sheets: A100 SXM4 80GB and 40GB, H100 SXM5, H200 SXM, HGX B200 (per GPU).
ACCELERATORS: dict[str, Accelerator] = {
    "A100": Accelerator("A100", 312e12, 2.039e12, 80e9, 300e9),
    "A100-40GB": Accelerator("A100-40GB", 312e12, 1.555e12, 40e9, 300e9),
    "H100": Accelerator("H100", 989e12, 3.35e12, 80e9, 450e9),
    "H200": Accelerator("H200", 989e12, 4.8e12, 141e9, 450e9),
    "B200": Accelerator("B200", 2250e12, 8.0e12, 180e9, 900e9),
}

# Sizes by the published architecture they stand for (their Hugging Face config.json shapes,
# rlhfspec/models/catalog.py): Qwen2.5 for 7B, 14B and 32B, Llama 3.1 for 8B and 70B.
SIZES = {"7b": "qwen2.5-7b", "8b": "llama-3.1-8b", "14b": "qwen2.5-14b", "32b": "qwen2.5-32b", "70b": "llama-3.1-70b",
         "0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b"}


def accelerator(name: str) -> Accelerator:
    """The accelerator named (case-insensitive), or one sentence listing the known ones."""
    found = ACCELERATORS.get(name.upper())
    if found is None:
        raise RlhfspecError(f"accelerator {name!r} is unknown; choose one of {', '.join(ACCELERATORS)}.")
    return found


def model_config(name: str) -> ModelConfig:
    """A model by size ("7B", "70B"), by catalog name ("qwen2.5-7b"), or from a config.json (or its directory)."""
    key = name.lower()
    if key in SIZES:
        return catalog_config(SIZES[key])
    if key in CATALOG:
        return catalog_config(key)
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.is_file():
        return ModelConfig.from_hf(read_json(path, "model config"), source=str(path))
    raise RlhfspecError(f"model {name!r} is neither a size ({', '.join(s.upper() for s in SIZES)}), "
                        f"a catalog name ({', '.join(CATALOG)}) nor a config.json path.")


@dataclass(frozen=True)
class Shape:
    """What a forward reads and computes, per token and per cached token, from a ModelConfig."""

    weight_bytes: float  # weights one forward reads (the input embedding is gathered, not read whole)
    flops_per_token: float  # 2 x the parameters every token multiplies through, LM head included
    attention_flops_per_pair: float  # per (new token, cached token): QK^T and PV over every layer
    kv_bytes_per_token: float
    layers: int
    hidden: int

    @classmethod
    def of(cls, c: ModelConfig, bytes_per_param: float = 2.0) -> Shape:
        # Every parameter but an untied input embedding (gathered, a few rows) is read and multiplied through.
        used = c.num_params - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
        return cls(used * bytes_per_param, 2.0 * used, 4.0 * c.num_layers * c.num_heads * c.head_dim,
                   2.0 * c.num_layers * c.num_kv_heads * c.head_dim * bytes_per_param, c.num_layers, c.hidden_size)


@dataclass(frozen=True)
class Roofline:
    """Seconds of one forward on `tp` GPUs (tensor parallel): the larger of the bytes it reads over
    the achievable memory bandwidth and its FLOPs over the achievable peak, plus two all-reduces
    per layer when tp > 1 and a fixed per-step overhead (launches, sampling, scheduling).

    t(B, q, c) = overhead + allreduce + max(F / (tp * peak * flop_eff), R / (tp * bw * mem_eff)),
    F = B q (flops_per_token + attention_flops_per_pair (c + (q + 1) / 2)),
    R = weight_bytes + B (c + q) kv_bytes_per_token.
    """

    gpu: Accelerator
    shape: Shape
    tp: int = 1
    mem_eff: float = 0.8  # assumed
    flop_eff: float = 0.6  # assumed
    overhead_s: float = 1.5e-3  # assumed
    allreduce_latency_s: float = 8e-6  # assumed
    bytes_per_activation: float = 2.0

    def __post_init__(self):
        if self.tp < 1:
            raise RlhfspecError(f"tensor-parallel degree is {self.tp}; it must be at least 1.")

    def forward(self, batch: float, q: float, context: float) -> float:
        """Seconds for q new tokens per row over `batch` rows whose caches hold `context` tokens."""
        if batch <= 0:
            return 0.0
        s, tokens = self.shape, batch * q
        flops = tokens * (s.flops_per_token + s.attention_flops_per_pair * (context + (q + 1) / 2))
        bytes_read = s.weight_bytes + batch * (context + q) * s.kv_bytes_per_token
        body = max(flops / (self.tp * self.gpu.bf16_flops * self.flop_eff),
                   bytes_read / (self.tp * self.gpu.memory_bytes_per_second * self.mem_eff))
        comm = 0.0
        if self.tp > 1:
            ring = 2 * (self.tp - 1) / self.tp * tokens * s.hidden * self.bytes_per_activation / self.gpu.link_bytes_per_second
            comm = 2 * s.layers * (self.allreduce_latency_s + ring)
        return self.overhead_s + comm + body

    def fits(self, max_batch: int, max_len: int, what: str) -> None:
        """One sentence if the weights plus a full KV cache do not fit in the GPUs' memory."""
        s = self.shape
        need = (s.weight_bytes + max_batch * max_len * s.kv_bytes_per_token) / self.tp
        if need > 0.9 * self.gpu.memory_bytes:
            raise RlhfspecError(
                f"{what} needs {need / 1e9:.0f} GB per GPU for its weights and a KV cache of {max_batch} x {max_len} tokens "
                f"at tensor-parallel {self.tp}, over 90% of an {self.gpu.name}'s {self.gpu.memory_bytes / 1e9:.0f} GB; "
                "raise --tp or lower --max-batch.")


def read_json(path: Path, what: str):
    """The JSON document at `path`, or one sentence naming `what` it should have been."""
    if not path.is_file():
        raise RlhfspecError(f"{what} {path} does not exist.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RlhfspecError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno}).") from None
