"""An EAGLE-style draft head (Li et al. 2024): one decoder layer of the policy's own shape that
reads [the policy's feature at position t, the embedding of token t+1] and predicts the feature at
t+1, read out over a reduced draft vocabulary.

A feature is the policy's final hidden state after its last norm (what its output layer reads).
The head holds no embedding table: token embeddings are the policy's, passed in by the caller, so
a head follows its policy's embeddings as RL moves them. Saved as a directory: config.json (the
layer's config, the policy's sizes) and model.safetensors (weights and the draft vocabulary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhfspec.errors import RlhfspecError
from rlhfspec.models.config import ModelConfig
from rlhfspec.models.linear import Linear, Projection, projection
from rlhfspec.models.llama import Attention, Block, LayerPlan, decoder_layer, layer_plan
from rlhfspec.models.rope import inv_freq_and_scale, rope_tables

EAGLE_TYPE = "rlhfspec-eagle-head"
WEIGHTS = "model.safetensors"


@dataclass(slots=True)
class HeadPlan:
    key: tuple
    fc: Projection
    layer: LayerPlan
    readout: Projection


class EagleHead(nn.Module):
    """fc: [2H -> H] over [feature, embedding]; one decoder layer; readout [H -> len(vocab)].

    `vocab`: the sorted token ids the readout scores (the draft vocabulary); the policy's
    vocabulary size and hidden size are kept to refuse a policy the head was not made for.
    """

    def __init__(self, layer_config: ModelConfig, vocab: list[int], policy_vocab_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        if layer_config.num_layers != 1 or layer_config.vocab_size != len(vocab):
            raise RlhfspecError(f"an eagle head has one layer and a readout over its {len(vocab)} draft tokens; its config says "
                                f"{layer_config.num_layers} layers and {layer_config.vocab_size} tokens.")
        h = layer_config.hidden_size
        self.config = layer_config
        self.policy_vocab_size = policy_vocab_size
        self.fc = Linear(2 * h, h, False, dtype, device)
        self.layer = Block(layer_config, dtype, device)
        self.readout = Linear(h, len(vocab), False, dtype, device)
        self.register_buffer("vocab", torch.tensor(sorted(vocab), dtype=torch.long, device=device))
        self.register_buffer("rope_cos", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self._rope_len = 0
        self._plans: dict[tuple[bool, bool], HeadPlan] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def ensure_positions(self, max_len: int) -> None:
        """RoPE tables for positions [0, max_len) (the policy's rotary settings)."""
        if max_len <= self._rope_len:
            return
        c = self.config
        inv, scale = inv_freq_and_scale(c.rope, c.head_dim, max_len, c.max_position_embeddings)
        self.rope_cos, self.rope_sin = rope_tables(inv, scale, max_len, self.dtype, self.device)
        self._rope_len = max_len

    def plan(self, invariant: bool = False) -> HeadPlan:
        """The forward's projections, rebuilt whenever a parameter changes (as Transformer.plan)."""
        inference = not (torch.is_grad_enabled() and self.fc.weight.requires_grad) and not torch.is_autocast_enabled(self.device.type)
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        cached = self._plans.get((inference, invariant))
        if cached is not None and cached.key == key:
            return cached
        proj = lambda w, bias: projection(w, bias, inference, invariant)  # noqa: E731
        plan = HeadPlan(key, proj(self.fc.weight, None), layer_plan(self.layer, self.config, proj), proj(self.readout.weight, None))
        self._plans[(inference, invariant)] = plan
        return plan

    def forward(self, features: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        """features, embeds: [N, H] (the policy's feature at t and the embedding of token t+1),
        positions: [N] (t) -> the predicted features at t+1 [N, H]. Batch-invariant when the attention is."""
        plan = self.plan(attention.invariant)
        x = plan.fc(torch.cat((features, embeds), dim=-1))
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        return decoder_layer(x, plan.layer, 0, cos, sin, attention, self.config)

    def logits(self, predicted: torch.Tensor, invariant: bool = False) -> torch.Tensor:
        """predicted features [N, H] -> float32 logits over the draft vocabulary [N, len(vocab)]."""
        return self.plan(invariant).readout(predicted).float()

    def check_fits(self, policy) -> None:
        """One sentence if this head was not made for a policy of this hidden size and vocabulary."""
        pc = policy.config
        if pc.hidden_size != self.hidden_size:
            raise RlhfspecError(f"the eagle head reads {self.hidden_size}-wide features but the policy's hidden size is "
                                f"{pc.hidden_size}; train a head for this policy (rlhfspec distill-draft --kind eagle).")
        if pc.vocab_size != self.policy_vocab_size:
            raise RlhfspecError(f"the eagle head was made for a vocabulary of {self.policy_vocab_size} tokens but the policy's has "
                                f"{pc.vocab_size}; a drafter must share the policy's tokenizer.")

    def save(self, path: str | Path) -> Path:
        """config.json + model.safetensors (nothing pickled)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"model_type": EAGLE_TYPE, "hidden_size": self.hidden_size, "policy_vocab_size": self.policy_vocab_size,
                  "draft_vocab_size": len(self.vocab), "layer": self.config.to_hf()}
        (path / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / WEIGHTS))
        return path

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> EagleHead:
        path = Path(path)
        if not is_eagle_dir(path):
            raise RlhfspecError(f"{path} is not an eagle head directory (config.json with model_type {EAGLE_TYPE!r}); "
                                "make one with: rlhfspec distill-draft --kind eagle --out DIR")
        config = json.loads((path / "config.json").read_text())
        tensors = load_file(str(path / WEIGHTS))
        vocab = tensors["vocab"].tolist()
        # A head's layer has no embedding: a pad token the policy declared means nothing here
        # (heads saved before that was dropped carry the policy's, possibly past the draft vocabulary).
        layer = ModelConfig.from_hf({k: v for k, v in config["layer"].items() if k != "pad_token_id"}, source=str(path / "config.json"))
        head = cls(layer, vocab, config["policy_vocab_size"], dtype=dtype, device=device)
        missing = sorted(set(head.state_dict()) - set(tensors))
        if missing:
            raise RlhfspecError(f"{path / WEIGHTS} has no tensor {missing[0]!r}; it is not a complete eagle head.")
        with torch.no_grad():
            head.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()})
        return head.eval().requires_grad_(False)


def is_eagle_dir(path: str | Path) -> bool:
    """Whether `path` is a directory holding an eagle head (rather than a draft model)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == EAGLE_TYPE
    except (json.JSONDecodeError, AttributeError):
        return False


def head_config(policy: ModelConfig, draft_vocab_size: int) -> ModelConfig:
    """The policy's own decoder-layer shape (heads, widths, RoPE, biases), one layer, the draft vocabulary."""
    hf = policy.to_hf()
    hf.update(num_hidden_layers=1, vocab_size=draft_vocab_size, tie_word_embeddings=False)
    hf.pop("pad_token_id", None)  # the head embeds nothing; the policy's pad id may lie past the draft vocabulary
    return ModelConfig.from_hf(hf, source="eagle head config")
