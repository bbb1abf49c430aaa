"""Attention over a per-slot KV cache (generation) or over padded sequences (training).

Both fold each KV head's group of query heads into the query-length axis, so one
`scaled_dot_product_attention` call serves GQA without repeating K and V:
q [N, Hq, D] -> [B, Hkv, G*Q, D] against k, v [B, Hkv, L, D], rows ordered (group, query).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fold_queries(q: torch.Tensor, batch: int, qlen: int, kv_heads: int) -> torch.Tensor:
    """q: [B*Q, Hq, D] (row b*Q+t) -> [B, Hkv, G*Q, D]."""
    _, hq, d = q.shape
    g = hq // kv_heads
    if qlen == 1:
        return q.view(batch, kv_heads, g, d)
    return q.view(batch, qlen, kv_heads, g, d).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, g * qlen, d)


def unfold_output(out: torch.Tensor, batch: int, qlen: int) -> torch.Tensor:
    """out: [B, Hkv, G*Q, D] -> [B*Q, Hq*D] (row b*Q+t)."""
    _, hkv, gq, d = out.shape
    if qlen == 1:
        return out.reshape(batch, hkv * gq * d)
    g = gq // qlen
    return out.view(batch, hkv, g, qlen, d).permute(0, 3, 1, 2, 4).reshape(batch * qlen, hkv * g * d)


class CacheAttention:
    """One forward's view of a `KVCache`: sample b writes q_lens[b] new rows at starts[b] of slots[b].

    When the slots form a contiguous range (the engine keeps live samples packed) K and V are
    read as views of the cache; any other set of slots is gathered.
    """

    def __init__(self, cache, slots: list[int], starts: list[int], q_lens: list[int]):
        self.cache = cache
        self.batch = len(starts)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        dev = cache.device
        slot_t = torch.tensor(slots, device=dev)
        self.slots = slice(slots[0], slots[0] + self.batch) if contiguous else slot_t
        self.qmax = max(q_lens)
        self.kv_len = max(s + q for s, q in zip(starts, q_lens))
        start_t = torch.tensor(starts, device=dev)
        if self.qmax == 1:
            self.positions = start_t
            self.pad_index = None
        else:
            rows = [b * self.qmax + t for b, q in enumerate(q_lens) for t in range(q)]
            self.pad_index = torch.tensor(rows, device=dev)
            self.positions = torch.tensor([s + t for s, q in zip(starts, q_lens) for t in range(q)], device=dev)
        slot_ids = torch.repeat_interleave(slot_t, torch.tensor(q_lens, device=dev)) if self.qmax > 1 else slot_t
        self.flat_rows = slot_ids * cache.max_len + self.positions
        # Query (b, t) sees key j iff j <= starts[b] + t; padded queries see key 0 only.
        last = start_t[:, None] + torch.arange(self.qmax, device=dev)[None, :]
        if self.qmax > 1:
            valid = torch.arange(self.qmax, device=dev)[None, :] < torch.tensor(q_lens, device=dev)[:, None]
            last = torch.where(valid, last, torch.zeros_like(last))
        mask = torch.arange(self.kv_len, device=dev)[None, None, :] <= last[:, :, None]
        # Every layer's keys and values for this forward: [layers, B, Hkv, L, D] views of the cache
        # (a gathered copy would miss the rows this forward writes, so other slot sets gather per layer).
        self.keys = cache.k[:, self.slots, : self.kv_len].transpose(2, 3) if contiguous else None
        self.values = cache.v[:, self.slots, : self.kv_len].transpose(2, 3) if contiguous else None
        g = cache.num_heads // cache.num_kv_heads
        if self.qmax == 1:
            # Decoding samples of equal length need no mask (the common case at batch 1).
            uniform = all(s + q == self.kv_len for s, q in zip(starts, q_lens))
            self.mask = None if uniform else mask[:, None]
        else:
            self.mask = mask[:, None].repeat(1, 1, g, 1)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [N, Hq, D], k, v: [N, Hkv, D] -> [N, Hq*D]; writes k, v into the cache first."""
        c = self.cache
        c.k_rows[layer].index_copy_(0, self.flat_rows, k)
        c.v_rows[layer].index_copy_(0, self.flat_rows, v)
        hkv = k.shape[1]
        if self.pad_index is not None:
            padded = q.new_zeros(self.batch * self.qmax, q.shape[1], q.shape[2])
            q = padded.index_copy_(0, self.pad_index, q)
        if self.keys is not None:
            keys, values = self.keys[layer], self.values[layer]
        else:
            keys = c.k[layer][self.slots, : self.kv_len].transpose(1, 2)
            values = c.v[layer][self.slots, : self.kv_len].transpose(1, 2)
        out = F.scaled_dot_product_attention(fold_queries(q, self.batch, self.qmax, hkv), keys, values, attn_mask=self.mask)
        out = unfold_output(out, self.batch, self.qmax)
        return out if self.pad_index is None else out.index_select(0, self.pad_index)


class DenseAttention:
    """Causal attention over a padded batch [B, T] with a 0/1 `attention_mask` (any padding side)."""

    def __init__(self, attention_mask: torch.Tensor, num_heads: int, num_kv_heads: int):
        b, t = attention_mask.shape
        self.batch, self.qlen = b, t
        valid = attention_mask.bool()
        self.positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).reshape(-1)
        causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
        # Padding queries attend to themselves only, so no row is empty.
        mask = (causal[None] & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=valid.device)[None]
        self.mask = mask[:, None].repeat(1, 1, num_heads // num_kv_heads, 1)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t = self.batch, self.qlen
        hkv = k.shape[1]
        keys = k.view(b, t, hkv, -1).transpose(1, 2)
        values = v.view(b, t, hkv, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(fold_queries(q, b, t, hkv), keys, values, attn_mask=self.mask)
        return unfold_output(out, b, t)
