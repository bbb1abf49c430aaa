"""Hugging Face checkpoints in and out: tensor names, fused projections, safetensors shards."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlhfspec.errors import RlhfspecError
from rlhfspec.models.config import ModelConfig


def hf_names(config: ModelConfig) -> dict[str, list[str]]:
    """Internal parameter name -> the transformers tensor names concatenated (dim 0) to make it."""
    names: dict[str, list[str]] = {"embed.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        names[ours + "input_norm.weight"] = [hf + "input_layernorm.weight"]
        names[ours + "post_norm.weight"] = [hf + "post_attention_layernorm.weight"]
        names[ours + "qkv.weight"] = [attn + p + "_proj.weight" for p in "qkv"]
        names[ours + "o.weight"] = [attn + "o_proj.weight"]
        names[ours + "gate_up.weight"] = [mlp + "gate_proj.weight", mlp + "up_proj.weight"]
        names[ours + "down.weight"] = [mlp + "down_proj.weight"]
        if config.qkv_bias:
            names[ours + "qkv.bias"] = [attn + p + "_proj.bias" for p in "qkv"]
        if config.o_bias:
            names[ours + "o.bias"] = [attn + "o_proj.bias"]
        if config.mlp_bias:
            names[ours + "gate_up.bias"] = [mlp + "gate_proj.bias", mlp + "up_proj.bias"]
            names[ours + "down.bias"] = [mlp + "down_proj.bias"]
        if config.qk_norm:
            names[ours + "q_norm.weight"] = [attn + "q_norm.weight"]
            names[ours + "k_norm.weight"] = [attn + "k_norm.weight"]
    return names


def from_hf(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A transformers state dict -> this package's (fused) state dict."""
    out = {}
    for ours, theirs in hf_names(config).items():
        missing = [t for t in theirs if t not in tensors]
        if missing:
            raise RlhfspecError(f"{source} has no tensor {missing[0]!r}; it is not a complete {config.model_type} checkpoint.")
        parts = [tensors[t] for t in theirs]
        out[ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


def to_hf(model) -> dict[str, torch.Tensor]:
    """This package's state dict -> transformers names (fused projections split back)."""
    c = model.config
    state = model.state_dict()
    sizes = {
        "qkv": [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim],
        "gate_up": [c.intermediate_size, c.intermediate_size],
    }
    out = {}
    for ours, theirs in hf_names(c).items():
        t = state[ours].detach()
        kind = ours.split(".")[-2]
        parts = torch.split(t, sizes[kind], dim=0) if len(theirs) > 1 else (t,)
        for name, part in zip(theirs, parts):
            out[name] = part.contiguous().cpu()
    return out


def read_hf_config(path: Path) -> dict:
    """A transformers directory's config.json."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise RlhfspecError(f"{path} has no config.json; pass a Hugging Face model directory, a .gguf file or 'default'.")
    return json.loads(config_file.read_text())


def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers directory (single or sharded safetensors, or pytorch_model*.bin)."""
    tensors: dict[str, torch.Tensor] = {}
    shards = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    if shards:
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
    else:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise RlhfspecError(f"{path} has a config.json but no *.safetensors or pytorch_model*.bin weights.")
        for b in bins:
            tensors.update(torch.load(b, map_location="cpu", weights_only=True))
    return tensors


def save_pretrained(model, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write config.json, model.safetensors (and tokenizer files) that transformers loads.

    Written to a temporary directory first and renamed, so a crash never leaves a half checkpoint.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    config = model.config.to_hf()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_file(to_hf(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out

