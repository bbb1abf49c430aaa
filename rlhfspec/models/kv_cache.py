"""A preallocated KV cache with one slot per live sample and a length per slot."""

from __future__ import annotations

import torch

from rlhfspec.errors import RlhfspecError
from rlhfspec.models.attention import CacheAttention, TreeRows
from rlhfspec.models.invariant_attention import attention_layout
from rlhfspec.models.config import ModelConfig


class KVCache:
    """k, v: [layers, slots, kv_heads, len, head_dim]; `lengths[s]` rows of slot s are valid.

    Rows past a slot's length are stale and masked, so rolling back is shortening the length.
    `invariant` selects the batch-invariant attention (see attention.py); its key padding needs
    the allocated length rounded up to a whole padding step, and it keeps bfloat16 models'
    keys and values in float32.
    """

    def __init__(self, config: ModelConfig, max_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", invariant: bool = True):
        self.invariant = invariant
        if invariant and dtype == torch.bfloat16:
            # Attention in float32 over bf16-valued keys and values (exact in float32): library
            # bf16 batched products copy every strided operand, which costs more than reading
            # float32 rows in place, and torch's fused bf16 kernel is not batch-invariant.
            dtype = torch.float32
        step = attention_layout(dtype, torch.device(device), config.head_dim)[1] if invariant else 1
        self.alloc_len = -(-max_len // step) * step
        shape = (config.num_layers, max_slots, config.num_kv_heads, self.alloc_len, config.head_dim)
        # Zeros, not empty: masked rows still meet the value matmul, and 0 * NaN would be NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_slots, self.max_len = max_slots, max_len
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.dtype, self.device = dtype, self.k.device
        self.lengths = [0] * max_slots
        # Per-layer row views [slots*kv_heads*len, head_dim] that index_copy_ writes into.
        self.k_rows = [layer.view(-1, config.head_dim) for layer in self.k]
        self.v_rows = [layer.view(-1, config.head_dim) for layer in self.v]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def bytes_per_token(self) -> int:
        """What one token's K and V rows occupy (all layers)."""
        return 2 * self.k.shape[0] * self.num_kv_heads * self.head_dim * self.k.element_size()

    def attend(self, slots: list[int], q_lens: list[int], tree: TreeRows | None = None) -> CacheAttention:
        """Attention for one forward that appends q_lens[b] tokens to slot slots[b] (as token trees, if given)."""
        starts = [self.lengths[s] for s in slots]
        for slot, s, q in zip(slots, starts, q_lens):
            if s + q > self.max_len:
                raise RlhfspecError(f"slot {slot} needs {s + q} KV rows but the cache holds {self.max_len}; raise max_len.")
        return CacheAttention(self, slots, starts, q_lens, tree)

    def advance(self, slots: list[int], q_lens: list[int]) -> None:
        """Commit the rows a forward wrote."""
        for slot, q in zip(slots, q_lens):
            self.lengths[slot] += q

    def forward(self, model, slots: list[int], new_tokens: list[list[int]], last_only: bool = True, advance: bool = True,
                tree: TreeRows | None = None) -> torch.Tensor:
        """Append new_tokens[b] to slots[b] in one packed forward of `model` (laid out as token trees,
        if given); the final hidden states of each slot's last new row ([B, H]) or of every new row
        ([sum q, H]). advance False leaves the lengths as they were (a timing probe)."""
        q_lens = [len(t) for t in new_tokens]
        attention = self.attend(slots, q_lens, tree)
        flat = torch.tensor([t for ts in new_tokens for t in ts], device=self.device)
        hidden = model(flat, attention.positions, attention)
        if last_only and max(q_lens) > 1:
            hidden = hidden[torch.tensor(q_lens, device=hidden.device).cumsum(0) - 1]
        if advance:
            self.advance(slots, q_lens)
        return hidden

    def keep(self, slot: int, start: int, rows: list[int]) -> None:
        """Copy the given rows of a slot to rows start, start + 1, ... (a tree's accepted path
        becomes contiguous) and make start + len(rows) the slot's length."""
        if rows and rows != list(range(start, start + len(rows))):
            src = torch.tensor(rows, device=self.device)
            self.k[:, slot, :, start : start + len(rows)] = self.k[:, slot, :, src]
            self.v[:, slot, :, start : start + len(rows)] = self.v[:, slot, :, src]
        self.lengths[slot] = start + len(rows)

    def copy(self, src: int, dst: int) -> None:
        """Make slot dst hold slot src's valid rows (a shared prompt's prefill)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def move(self, src: int, dst: int) -> None:
        """Move slot src's valid rows into slot dst (used to keep live slots packed)."""
        self.copy(src, dst)
        self.lengths[src] = 0

    def rows(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A slot's valid K and V rows: [layers, len, kv_heads, head_dim] each (copies)."""
        n = self.lengths[slot]
        return self.k[:, slot, :, :n].transpose(1, 2).contiguous(), self.v[:, slot, :, :n].transpose(1, 2).contiguous()

    def load_rows(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill a slot with rows exported by `rows` (possibly from another instance)."""
        n = k.shape[1]
        if n > self.max_len:
            raise RlhfspecError(f"a migrated sample brings {n} KV rows but this cache holds {self.max_len}; raise max_len.")
        self.k[:, slot, :, :n] = k.transpose(1, 2).to(self.k.device, self.k.dtype)
        self.v[:, slot, :, :n] = v.transpose(1, 2).to(self.v.device, self.v.dtype)
        self.lengths[slot] = n

