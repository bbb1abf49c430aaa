"""Read a llama.cpp `.gguf` file into a transformers config dict and state dict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rlhfspec.errors import RlhfspecError

# llama.cpp architecture -> transformers model_type
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
DEQUANTIZABLE = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}

_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A transformers-style config dict and float32 state dict (dequantized, Q/K rows un-permuted)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise RlhfspecError(f"{path.name}: GGUF architecture {arch!r} is not supported; rlhfspec reads {', '.join(ARCHITECTURES)}.")
    a = arch
    heads = _field(reader, f"{a}.attention.head_count")
    kv_heads = _field(reader, f"{a}.attention.head_count_kv", heads)
    hidden = _field(reader, f"{a}.embedding_length")
    head_dim = _field(reader, f"{a}.attention.key_length", hidden // heads)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise RlhfspecError(f"{path.name} carries per-frequency RoPE factors (rope_freqs), which rlhfspec does not read; use the Hugging Face checkpoint.")
    config = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": _field(reader, f"{a}.vocab_size", len(tokens) if tokens else None),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{a}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{a}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": _field(reader, f"{a}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
    }
    scaling = _field(reader, f"{a}.rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(_field(reader, f"{a}.rope.scaling.factor"))}
        original = _field(reader, f"{a}.rope.scaling.original_context_length")
        if original:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    if arch == "qwen2":
        config["use_sliding_window"] = False

    state = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in DEQUANTIZABLE:
            raise RlhfspecError(f"{path.name}: tensor {t.name} is stored as {kind}, which rlhfspec cannot dequantize.")
        values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        name = _hf_name(t.name, path)
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            values = unpermute_rope_rows(values, heads)
        elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            values = unpermute_rope_rows(values, kv_heads)
        state[name] = values
    return config, state


def _hf_name(name: str, path: Path) -> str:
    if name in _TENSOR_NAMES:
        return _TENSOR_NAMES[name]
    parts = name.split(".")
    if parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[-1]}"
    raise RlhfspecError(f"{path.name}: tensor {name!r} has no place in a Llama-family model.")


def unpermute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time row permutation of q/k projections (interleaved -> half-split RoPE).

    llama.cpp stores rows of each head in (pair, 2) order: w.view(h, 2, D/2, ...).swapaxes(1, 2).
    """
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
