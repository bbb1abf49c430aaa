"""Architecture hyper-parameters read from (and written back to) a transformers `config.json`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from rlhfspec.errors import RlhfspecError

SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Llama-family decoder: RMSNorm, RoPE, GQA, SwiGLU; Qwen2's qkv bias; Qwen3's q/k norm."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: dict[str, Any]  # transformers' `rope_parameters`: rope_type, rope_theta, scaling keys
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # transformers builds the embedding with padding_idx=pad_token_id: that row's vector gets no
    # gradient from the inputs, so training leaves it as it is (negative counts from the end).
    pad_token_id: int | None
    hf: dict[str, Any] = field(compare=False, repr=False)  # the source config, written back on save

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a transformers config dict; unsupported architectures are a clear error."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED:
            raise RlhfspecError(
                f"{source}: model_type {model_type!r} is not supported; rlhfspec runs "
                f"{', '.join(sorted(SUPPORTED))} checkpoints."
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise RlhfspecError(f"{source}: hidden_act {act!r} is not supported; only 'silu' (SwiGLU) is.")
        if model_type in ("mistral", "qwen2", "qwen3") and hf.get("use_sliding_window", model_type == "mistral") and hf.get("sliding_window"):
            raise RlhfspecError(f"{source}: sliding-window attention is not supported; use a config with sliding_window null.")
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        pad = hf.get("pad_token_id")
        if pad is not None and not -hf["vocab_size"] <= pad < hf["vocab_size"]:
            raise RlhfspecError(f"{source}: pad_token_id {pad} is outside the vocabulary (vocab_size {hf['vocab_size']}); "
                                "transformers cannot build this checkpoint's embedding either: fix or remove pad_token_id.")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=rope_parameters(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=pad,
            hf=copy.deepcopy(hf),
        )

    def to_hf(self) -> dict[str, Any]:
        """A config dict `transformers.AutoConfig` reads back into the same architecture."""
        hf = copy.deepcopy(self.hf)
        hf.setdefault("architectures", [SUPPORTED[self.model_type]])
        hf.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
        )
        if self.pad_token_id is not None:
            hf["pad_token_id"] = self.pad_token_id
        # Written in the form both transformers 4.x and 5.x read: rope_theta plus rope_scaling.
        for key in ("rope_parameters", "rope_scaling", "rope_theta"):
            hf.pop(key, None)
        rope = dict(self.rope)
        hf["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            hf["rope_scaling"] = rope
        if self.model_type == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = self.mlp_bias
        hf.pop("quantization_config", None)
        hf.pop("_name_or_path", None)
        return hf

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * h * self.intermediate_size
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + emb + h


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """Normalise the two config spellings (4.x rope_theta + rope_scaling, 5.x rope_parameters) to one dict."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params["rope_type"] = params.pop("type", None) or params.get("rope_type") or "default"
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault(
            "original_max_position_embeddings",
            hf.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048)),
        )
    return params
