"""Well-known dense architectures by name, as their Hugging Face config.json gives them, for
timing the engine at real sizes with random weights (step times do not depend on the values)
and for the simulator's cost models."""

from __future__ import annotations

import torch

from rlhfspec.errors import RlhfspecError
from rlhfspec.models.config import ModelConfig
from rlhfspec.models.llama import Transformer

_LLAMA = {"model_type": "llama", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 131072,
          "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
_QWEN = {"model_type": "qwen2", "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
         "use_sliding_window": False, "vocab_size": 152064, "tie_word_embeddings": False}

CATALOG: dict[str, dict] = {
    "smollm2-135m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 100000.0},
    "qwen2.5-0.5b": {**_QWEN, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "llama-3.2-1b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True,
                     "rope_scaling": {**_LLAMA["rope_scaling"], "factor": 32.0}},
    "qwen2.5-1.5b": {**_QWEN, "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen2.5-7b": {**_QWEN, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4},
    "llama-3.1-8b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8},
    "qwen2.5-14b": {**_QWEN, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
                    "num_attention_heads": 40, "num_key_value_heads": 8},
    "qwen2.5-32b": {**_QWEN, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
                    "num_attention_heads": 40, "num_key_value_heads": 8},
    "llama-3.1-70b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8},
}


def catalog_config(name: str) -> ModelConfig:
    """The ModelConfig of a catalogued architecture."""
    if name not in CATALOG:
        raise RlhfspecError(f"model {name!r} is not in the catalog; choose one of {', '.join(CATALOG)}.")
    return ModelConfig.from_hf(dict(CATALOG[name]), source=f"catalog:{name}")


def random_model(name: str, dtype: torch.dtype, device: str | torch.device) -> Transformer:
    """A catalogued architecture with random weights (std 0.02, norms 1), for timing only."""
    model = Transformer(catalog_config(name), dtype=dtype, device=device).eval().requires_grad_(False)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model
