"""The Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2/2.5, Qwen3) on packed tokens.

Modules hold the parameters under stable names; the forward pass walks a `Plan` of plain
tensors and projection callables instead of calling submodules, because on the CPU decode
path Python's module machinery costs as much as the small ops it dispatches. Projections are
fused (q|k|v and gate|up), so a layer is four matmuls; the attention is a callable
(`CacheAttention` for generation, `DenseAttention` for training) so one set of weights serves
the engine and the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlhfspec.models.config import ModelConfig
from rlhfspec.models.invariance import rowwise, rowwise_
from rlhfspec.models.linear import Linear, Projection, projection
from rlhfspec.models.rope import apply_rope, inv_freq_and_scale, rope_tables

class Attention(Protocol):
    """What the forward calls per layer: q [N, Hq, D], k, v [N, Hkv, D] -> [N, Hq*D]."""

    invariant: bool  # whether it (and so the forward's projections) is batch-invariant
    positions: torch.Tensor

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, cast back, scale. x: [..., H]."""
    # Written out: F.rms_norm's CPU path is several times slower for the few rows of a decode step.
    if x.dtype == torch.float32:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight
    h = x.float()
    return weight * (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Block(nn.Module):
    """One decoder layer's parameters."""

    def __init__(self, c: ModelConfig, dtype: torch.dtype, device):
        super().__init__()
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.qkv = Linear(c.hidden_size, q_out + 2 * kv_out, c.qkv_bias, dtype, device)
        self.o = Linear(q_out, c.hidden_size, c.o_bias, dtype, device)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device) if c.qk_norm else None
        self.post_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.gate_up = Linear(c.hidden_size, 2 * c.intermediate_size, c.mlp_bias, dtype, device)
        self.down = Linear(c.intermediate_size, c.hidden_size, c.mlp_bias, dtype, device)


@dataclass(slots=True)
class LayerPlan:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qk_norm: torch.Tensor | None  # q_norm's weight for the q heads, k_norm's for the k heads: [Hq+Hkv, D]
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection


@dataclass(slots=True)
class Plan:
    key: tuple
    layers: list[LayerPlan]
    head: Projection
    invariant: bool

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_mul(gate_up, self.invariant)


def silu_mul(gate_up: torch.Tensor, invariant: bool) -> torch.Tensor:
    """silu(gate) * up for gate_up [N, 2I]; in row blocks that run on one thread when invariant."""
    gate, up = gate_up.chunk(2, dim=-1)
    if not invariant:
        return F.silu(gate) * up
    if torch.is_grad_enabled() and gate_up.requires_grad:
        return rowwise(F.silu, gate) * up
    return rowwise_(lambda rows: F.silu(rows, inplace=True), gate) * up


def layer_plan(b: Block, c: ModelConfig, proj: Callable[[torch.Tensor, torch.Tensor | None], Projection]) -> LayerPlan:
    """One decoder layer's parameters as the forward reads them (`proj` turns a weight and bias into a projection)."""
    qk_norm = None
    if b.q_norm is not None:
        qk_norm = torch.cat((b.q_norm.weight.expand(c.num_heads, -1), b.k_norm.weight.expand(c.num_kv_heads, -1)))
    return LayerPlan(b.input_norm.weight, b.post_norm.weight, qk_norm, proj(b.qkv.weight, b.qkv.bias), proj(b.o.weight, b.o.bias),
                     proj(b.gate_up.weight, b.gate_up.bias), proj(b.down.weight, b.down.bias))


def decoder_layer(x: torch.Tensor, layer: LayerPlan, i: int, cos: torch.Tensor, sin: torch.Tensor, attention: Attention,
                  c: ModelConfig) -> torch.Tensor:
    """One pre-norm decoder layer over packed rows: x [N, H] -> [N, H]; `i` is the layer's index in
    the attention's cache; cos, sin [N, 1, D] are the rows' RoPE tables."""
    n, hq, hkv, d, eps = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps
    qkv = layer.qkv(rms_norm(x, layer.input_norm, eps)).view(n, hq + 2 * hkv, d)
    # split, not slicing: the same views, but the backward pass joins their gradients in one
    # concatenation instead of a zeroed full-size gradient per slice added up.
    qk, v = qkv.split((hq + hkv, hkv), dim=1)
    if layer.qk_norm is not None:
        qk = rms_norm(qk, layer.qk_norm, eps)
    q, k = apply_rope(qk, cos, sin).split((hq, hkv), dim=1)
    x = x + layer.o(attention(i, q, k, v))
    return x + layer.down(silu_mul(layer.gate_up(rms_norm(x, layer.post_norm, eps)), attention.invariant))


class Transformer(nn.Module):
    """Decoder over packed tokens: `forward(tokens [N], positions [N], attention) -> hidden [N, H]`."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Block(config, dtype, device) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, False, dtype, device)
        self._rope_len = 0
        self._plans: dict[tuple[bool, bool], Plan] = {}
        self._param_list: list[nn.Parameter] | None = None  # walking the modules each forward costs ~0.5 ms
        # Gradient checkpointing: a forward that records autograd keeps only each layer's input and
        # runs the layer again in the backward pass; forwards without autograd (generation,
        # scoring) are not affected.
        self.checkpointing = False
        self.register_buffer("rope_cos", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def head_weight(self) -> torch.Tensor:
        """The output layer's weight [V, H]: lm_head's, or the embedding's when they are tied."""
        return self.lm_head.weight if self.lm_head is not None else self.embed.weight

    def ensure_positions(self, max_len: int) -> None:
        """Build the RoPE tables for positions [0, max_len) (once, grown on demand)."""
        if max_len <= self._rope_len:
            return
        c = self.config
        inv, scale = inv_freq_and_scale(c.rope, c.head_dim, max_len, c.max_position_embeddings)
        self.rope_cos, self.rope_sin = rope_tables(inv, scale, max_len, self.dtype, self.device)
        self._rope_len = max_len

    def projection_weights(self) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """(name, weight, bias) of every distinct projection shape: one layer's four and the output layer."""
        b = self.layers[0]
        return [("qkv", b.qkv.weight, b.qkv.bias), ("o", b.o.weight, b.o.bias), ("gate_up", b.gate_up.weight, b.gate_up.bias),
                ("down", b.down.weight, b.down.bias), ("head", self.head_weight, None)]

    def plan(self, invariant: bool = False) -> Plan:
        """The forward's view of the parameters, rebuilt (and repacked) whenever any of them changes;
        `invariant` makes every inference projection batch-invariant (see invariance.py)."""
        # Under autocast every projection is a plain F.linear, which autocast casts (a packed
        # inference kernel would bypass it).
        inference = not (torch.is_grad_enabled() and self.embed.weight.requires_grad) and not torch.is_autocast_enabled(self.device.type)
        if self._param_list is None:
            self._param_list = list(self.parameters())
        key = tuple((p.data_ptr(), p._version) for p in self._param_list)
        cached = self._plans.get((inference, invariant))
        if cached is not None and cached.key == key:
            return cached
        proj = lambda w, bias: projection(w, bias, inference, invariant)  # noqa: E731
        layers = [layer_plan(b, self.config, proj) for b in self.layers]
        plan = Plan(key, layers, proj(self.head_weight, None), invariant)
        self._plans[(inference, invariant)] = plan
        return plan

    def _apply(self, fn, recurse=True):
        self._param_list = None  # .to() and friends may swap parameters
        return super()._apply(fn, recurse)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        """tokens, positions: [N] -> final hidden states (before the last norm) [N, H].

        Batch-invariant (every row's bits independent of the other rows) when the attention is.
        """
        plan = self.plan(attention.invariant)
        x = F.embedding(tokens, self.embed.weight, padding_idx=self.config.pad_token_id)  # as transformers' nn.Embedding
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        recompute = self.checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(plan.layers):
            if recompute:
                x = checkpoint(decoder_layer, x, layer, i, cos, sin, attention, self.config, use_reentrant=False, preserve_rng_state=False)
            else:
                x = decoder_layer(x, layer, i, cos, sin, attention, self.config)
        return x

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm: what the output layer (or a value, score or draft-vocabulary head) reads."""
        return rms_norm(hidden, self.norm.weight, self.config.rms_norm_eps)

    def logits(self, hidden: torch.Tensor, invariant: bool = False) -> torch.Tensor:
        """hidden: [..., H] -> float32 logits [..., V] (batch-invariant rows when `invariant`)."""
        return self.plan(invariant).head(self.normed(hidden)).float()
