"""Tiny random checkpoints written by transformers itself, and the real default model for slow tests."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
ARCHS = {
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "llama-mha-bias": {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
    "llama-linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "llama3-rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "llama-yarn-rope": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"head_dim": 32},
}


def tiny_hf_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A transformers model with random weights (norms and biases randomised too, so bugs in them show)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = arch.split("-")[0].replace("llama3", "llama")
    kwargs = {**TINY, **ARCHS[arch], **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path_factory):
    """Factory: arch -> path of a saved transformers checkpoint (config.json + model.safetensors)."""

    def make(arch: str = "llama", seed: int = 0, **overrides):
        path = tmp_path_factory.mktemp(arch)
        tiny_hf_model(arch, seed, **overrides).save_pretrained(path)
        return path

    return make


def local_ray(num_cpus: int):
    """A local Ray cluster for a test module's `cluster` fixture (no dashboard, no driver logs),
    stopped when the module is done."""
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


class StoppedClock:
    """A stand-in for the time module (its perf_counter) whose clock moves only when a test moves it."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def random_prompts(n: int, vocab: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """Prompts of varied lengths over token ids [3, vocab)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="session")
def default_model():
    from rlhfspec import load_model

    return load_model("default", dtype="float32")


@pytest.fixture(scope="session")
def default_hf_model():
    """transformers loading the very same GGUF file itself."""
    from transformers import AutoModelForCausalLM

    from rlhfspec.models.loader import default_gguf_path

    path = default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def drive(instance, seqs):
    """Run samples through one given instance with the one driver (a Coordinator over it, refilling every step)."""
    from rlhfspec.rollout.backend import InprocBackend
    from rlhfspec.rollout.coordinator import Coordinator

    return Coordinator(InprocBackend(lambda i: instance, 1), steps_per_call=1).run(seqs)
