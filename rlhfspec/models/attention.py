"""Attention over a per-slot KV cache (generation) or over padded sequences (training).

Both fold each KV head's group of query heads into the query-length axis, so one product serves
GQA without repeating K and V: q [N, Hq, D] -> [B, Hkv, G*Q, D] against k, v [B, Hkv, L, D].

Generation has two paths. The fast one is `scaled_dot_product_attention` over the batch padded
to its longest sample. The batch-invariant one (the default) gives every query row the same
bits whatever else is in the step: keys are padded to a multiple of a step (masked keys weigh
exactly 0), the value product reduces over at most KEY_BLOCK keys per call and adds the blocks
in order, and long prefills are cut into passes of a verified number of query rows. Which step
and which row counts keep a row's bits unchanged whatever the padding, the call's other rows and
entries is measured once per machine (invariant_attention.py), as for projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rlhfspec.errors import RlhfspecError
from rlhfspec.models.invariant_attention import attend_block, attention_layout, check_length, visible_bias

# Generation on a GPU leaves out cuDNN's attention: it builds an execution plan per shape on the
# host, and a decode step's key length is new at every step (on an H100, torch 2.11: 105 ms per
# step of the default model with it, 25-30 ms without, whatever the batch).
GENERATION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def generation_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`scaled_dot_product_attention` over a KV cache (see GENERATION_BACKENDS)."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with sdpa_kernel(GENERATION_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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


@dataclass(slots=True)
class TreeRows:
    """Where one forward's new rows sit in token trees (speculative trees, drafting branches), per
    sample b: new row t is written at cache row starts[b] + t as usual, but sits at RoPE position
    positions[b][t] and sees the cache rows [0, base[b]) plus seen[b][t] (rows >= base[b], itself
    included). A chain is positions start + t, base start, seen [start .. start + t]."""

    positions: list[list[int]]
    base: list[int]
    seen: list[list[list[int]]]

    def visible(self, b: int, t: int, length: int, device) -> torch.Tensor:
        """[length] bool: the keys new row t of sample b sees."""
        out = torch.zeros(length, dtype=torch.bool, device=device)
        out[: self.base[b]] = True
        out[torch.tensor(self.seen[b][t], device=device)] = True
        return out


class CacheAttention:
    """One forward's view of a `KVCache`: sample b writes q_lens[b] new rows at starts[b] of slots[b]
    (causally, or as the token trees `tree` describes)."""

    def __init__(self, cache, slots: list[int], starts: list[int], q_lens: list[int], tree: TreeRows | None = None):
        self.cache = cache
        self.invariant = cache.invariant
        self.batch = len(starts)
        dev = cache.device
        self.contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        self.slot_list = slots
        self.qmax = max(q_lens)
        self.kv_len = max(s + q for s, q in zip(starts, q_lens))
        self.tree = tree if tree is not None and self.qmax > 1 else None
        rows = torch.tensor([s + t for s, q in zip(starts, q_lens) for t in range(q)], device=dev)
        self.positions = rows if tree is None else torch.tensor([p for ps in tree.positions for p in ps], device=dev)
        hkv, length = cache.num_kv_heads, cache.alloc_len
        slot_t = torch.tensor(slots, device=dev)
        row_slot = torch.repeat_interleave(slot_t, torch.tensor(q_lens, device=dev))
        # Row (token, kv head) -> its place in the cache viewed as [slots*Hkv*len, D].
        self.write_index = ((row_slot[:, None] * hkv + torch.arange(hkv, device=dev)) * length + rows[:, None]).reshape(-1)
        self.slots = slice(slots[0], slots[0] + self.batch) if self.contiguous else slot_t
        if self.invariant:
            self.passes = _passes(cache, slots, starts, q_lens, self.contiguous, self.tree)
        else:
            self._dense_setup(starts, q_lens)

    def _dense_setup(self, starts: list[int], q_lens: list[int]) -> None:
        dev = self.cache.device
        start_t = torch.tensor(starts, device=dev)
        self.pad_index = None
        if self.qmax > 1:
            rows = [b * self.qmax + t for b, q in enumerate(q_lens) for t in range(q)]
            self.pad_index = torch.tensor(rows, device=dev)
        # Query (b, t) sees key j iff j <= starts[b] + t; padded queries see key 0 only.
        last = start_t[:, None] + torch.arange(self.qmax, device=dev)[None, :]
        if self.qmax > 1:
            valid = torch.arange(self.qmax, device=dev)[None, :] < torch.tensor(q_lens, device=dev)[:, None]
            last = torch.where(valid, last, torch.zeros_like(last))
        mask = torch.arange(self.kv_len, device=dev)[None, None, :] <= last[:, :, None]
        if self.tree is not None:
            for b, q in enumerate(q_lens):
                for t in range(q):
                    mask[b, t] = self.tree.visible(b, t, self.kv_len, dev)
        g = self.cache.num_heads // self.cache.num_kv_heads
        if self.qmax == 1:
            # Decoding samples of equal length need no mask (the common case at batch 1).
            uniform = all(s + q == self.kv_len for s, q in zip(starts, q_lens))
            self.mask = None if uniform else mask[:, None]
        else:
            self.mask = mask[:, None].repeat(1, 1, g, 1)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [N, Hq, D], k, v: [N, Hkv, D] -> [N, Hq*D]; writes k, v into the cache first."""
        c = self.cache
        d = k.shape[-1]
        c.k_rows[layer].index_copy_(0, self.write_index, k.reshape(-1, d).to(c.dtype))
        c.v_rows[layer].index_copy_(0, self.write_index, v.reshape(-1, d).to(c.dtype))
        if self.invariant:
            return self._invariant(layer, q)
        hkv = k.shape[1]
        if self.pad_index is not None:
            padded = q.new_zeros(self.batch * self.qmax, q.shape[1], q.shape[2])
            q = padded.index_copy_(0, self.pad_index, q)
        keys = c.k[layer][self.slots, :, : self.kv_len]
        values = c.v[layer][self.slots, :, : self.kv_len]
        out = generation_sdpa(fold_queries(q, self.batch, self.qmax, hkv), keys, values, self.mask)
        out = unfold_output(out, self.batch, self.qmax)
        return out if self.pad_index is None else out.index_select(0, self.pad_index)

    def _invariant(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        c = self.cache
        n, hq, d = q.shape
        hkv, g = c.num_kv_heads, hq // c.num_kv_heads
        dtype = q.dtype
        q = (q if dtype == c.dtype else q.to(c.dtype)) * (1.0 / math.sqrt(d))
        single = len(self.passes) == 1 and self.passes[0].rows is None
        out = None if single else q.new_empty(n, hq * d)
        qz = q if single else torch.cat((q, q.new_zeros(1, hq, d)))  # row n: the padding query
        for p in self.passes:
            e, qp = p.entries, p.queries
            rows = qz if p.rows is None else qz[p.rows]  # [E*qp, Hq, D]
            qf = rows.view(e, qp, hkv, g, d).transpose(1, 2).reshape(e, hkv, qp * g, d)
            if p.m > qp * g:
                qf = F.pad(qf, (0, 0, 0, p.m - qp * g))
            keys = c.k[layer][p.slots, :, : p.length]
            values = c.v[layer][p.slots, :, : p.length]
            o = attend_block(qf.reshape(e * hkv, p.m, d), keys.reshape(e * hkv, p.length, d),
                             values.reshape(e * hkv, p.length, d), p.bias, p.block, p.serial)
            o = o.view(e, hkv, p.m, d)[:, :, : qp * g].reshape(e, hkv, qp, g, d).transpose(1, 2).reshape(e * qp, hq * d)
            if single:
                return o if o.dtype == dtype else o.to(dtype)
            out.index_copy_(0, p.out_rows, o[p.valid] if p.valid is not None else o)
        return out.to(dtype)


class _Pass:
    """One call of `attend_block`: `queries` rows per entry (up to the verified tile), entries
    reading the cache at `slots`, keys padded to `length`."""

    __slots__ = ("entries", "queries", "m", "length", "block", "serial", "slots", "rows", "bias", "out_rows", "valid")


def _passes(cache, slots, starts, q_lens, contiguous, tree: TreeRows | None = None) -> list[_Pass]:
    dev = cache.device
    hkv, g = cache.num_kv_heads, cache.num_heads // cache.num_kv_heads
    plan, step, block, serial = attention_layout(cache.dtype, dev, cache.head_dim)
    per_pass = plan.tile // g
    if per_pass < 1:
        raise RlhfspecError(f"{g} query heads per KV head exceed the {plan.tile} query rows verified batch-invariant on this machine; use batch_invariant=False.")
    if contiguous and max(q_lens) == 1 and plan.padded(g) == g:
        return [_decode_pass(cache, slots, starts, step, block, serial)]
    offsets = [0]
    for q in q_lens:
        offsets.append(offsets[-1] + q)
    n = offsets[-1]
    out = []
    for first in range(0, max(q_lens), per_pass):
        members = [b for b, q in enumerate(q_lens) if q > first]
        counts = [min(q_lens[b] - first, per_pass) for b in members]
        e = len(members)
        p = _Pass()
        p.entries, p.queries = e, max(counts)
        p.m = plan.padded(p.queries * g)
        last = [starts[b] + first + c for b, c in zip(members, counts)]  # keys each entry's last query sees
        p.length, p.block, p.serial = -(-max(last) // step) * step, block, serial
        check_length(cache.dtype, dev, cache.head_dim, p.length)
        whole = e == len(slots)
        p.slots = slice(slots[0], slots[0] + len(slots)) if whole and contiguous else torch.tensor([slots[b] for b in members], device=dev)
        # Query row (entry, t) of this pass; padding points at row n (zeros).
        idx = [[offsets[b] + first + t if t < c else n for t in range(p.queries)] for b, c in zip(members, counts)]
        dense = whole and n == len(slots)  # one query per sample, in slot order
        p.rows = None if dense else torch.tensor(idx, device=dev).reshape(-1)
        pos = torch.tensor([[starts[b] + first + t if t < c else 0 for t in range(p.queries)] for b, c in zip(members, counts)], device=dev)
        seen = torch.arange(p.length, device=dev)[None, None, :] <= pos[:, :, None]  # [E, qp, L]
        if tree is not None:
            for i, (b, c) in enumerate(zip(members, counts)):
                for t in range(c):
                    seen[i, t] = tree.visible(b, first + t, p.length, dev)
        # Rows are ordered (query, group) inside an entry; padding rows see key 0.
        seen = seen[:, :, None, :].expand(-1, -1, g, -1).reshape(e, p.queries * g, p.length)
        if p.m > p.queries * g:
            pad = seen.new_zeros(e, p.m - p.queries * g, p.length)
            pad[:, :, 0] = True
            seen = torch.cat((seen, pad), dim=1)
        p.bias = visible_bias(seen, cache.dtype)[:, None].expand(-1, hkv, -1, -1).reshape(e * hkv, p.m, p.length)
        flat = torch.tensor([i for row in idx for i in row], device=dev)
        p.valid = None if dense or bool((flat < n).all()) else flat < n
        p.out_rows = flat if p.valid is None else flat[p.valid]
        out.append(p)
    return out


def _decode_pass(cache, slots, starts, step: int, block: int, serial: bool) -> _Pass:
    """The one pass of a decode step (one query per sample, slots in order): what the general
    loop of `_passes` builds for it, without its per-row Python."""
    dev = cache.device
    hkv, g = cache.num_kv_heads, cache.num_heads // cache.num_kv_heads
    p = _Pass()
    p.entries, p.queries, p.m = len(slots), 1, g
    p.length, p.block, p.serial = -(-(max(starts) + 1) // step) * step, block, serial
    check_length(cache.dtype, dev, cache.head_dim, p.length)
    p.slots = slice(slots[0], slots[0] + len(slots))
    p.rows, p.valid, p.out_rows = None, None, None
    seen = torch.arange(p.length, device=dev)[None, :] <= torch.tensor(starts, device=dev)[:, None]  # [E, L]
    p.bias = visible_bias(seen, cache.dtype)[:, None, None, :].expand(-1, hkv, g, -1).reshape(len(slots) * hkv, g, p.length)
    return p


# On the CPU in bfloat16, attention over at most this many (batch x heads x query x key) scores
# runs as plain products (`DenseAttention._math`): torch's fused kernel takes about 1.7x as long
# forward and backward at the trainer's shapes (12 x 9 heads x 170 x 170: 40 ms against 24), but
# keeps no scores for the backward pass, which the plain products do (6 bytes a score), so longer
# batches go back to it. Forwards without gradients take the same path, so the old logprobs a
# no-grad forward recomputes are the trained forward's to the bit (a first-step ratio of 1).
MATH_ATTENTION_ELEMENTS = 1 << 23


def _bf16_cpu(q: torch.Tensor) -> bool:
    """Whether this attention runs on the CPU in bfloat16 (autocast or bf16 tensors)."""
    if q.device.type != "cpu":
        return False
    return q.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class DenseAttention:
    """Causal attention over a padded batch [B, T] with a 0/1 `attention_mask` (any padding side)."""

    invariant = False

    def __init__(self, attention_mask: torch.Tensor, num_heads: int, num_kv_heads: int):
        b, t = attention_mask.shape
        self.batch, self.qlen = b, t
        valid = attention_mask.bool()
        self.positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).reshape(-1)
        causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
        # Padding queries attend to themselves only, so no row is empty.
        mask = (causal[None] & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=valid.device)[None]
        self._see(mask, num_heads // num_kv_heads)

    @classmethod
    def over(cls, visible: torch.Tensor, group: int, scores: int | None = None) -> DenseAttention:
        """Queries over keys as `visible` [B, Q, K] says (`group` query heads per KV head), for
        `_attend`; no positions (SharedPromptAttention's parts). `scores`: the (batch x query x key)
        scores of the whole attention this is a part of, which MATH_ATTENTION_ELEMENTS caps (its own
        by default)."""
        self = cls.__new__(cls)
        self._see(visible, group, scores)
        return self

    def _see(self, visible: torch.Tensor, group: int, scores: int | None = None) -> None:
        self.batch, self.qlen = visible.shape[:2]
        self.mask = visible[:, None].repeat(1, 1, group, 1)
        self._bias = None  # the mask as an additive float32 bias, built on first use by _math
        self.scores = scores

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t = self.batch, self.qlen
        hkv = k.shape[1]
        keys = k.view(b, t, hkv, -1).transpose(1, 2)
        values = v.view(b, t, hkv, -1).transpose(1, 2)
        return unfold_output(self._attend(fold_queries(q, b, t, hkv), keys, values, q.shape[1]), b, t)

    def _attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, heads: int) -> torch.Tensor:
        """Masked attention: queries [B, Hkv, G*Q, D], keys, values [B, Hkv, K, D] -> [B, Hkv, G*Q, D]."""
        if _bf16_cpu(queries) and (self.scores or self.batch * self.qlen * keys.shape[2]) * heads <= MATH_ATTENTION_ELEMENTS:
            return self._math(queries, keys, values)
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=self.mask)

    def _math(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The same attention as three bf16-friendly steps (scores, float32 softmax, value
        product): q [B, Hkv, G*Q, D], k, v [B, Hkv, K, D] -> [B, Hkv, G*Q, D]."""
        b, hkv, gq, d = q.shape
        qlen, klen = self.qlen, k.shape[2]
        if self._bias is None:
            self._bias = torch.zeros(self.mask.shape, device=self.mask.device).masked_fill_(~self.mask, float("-inf")).view(b, 1, -1, qlen, klen)
        low = torch.bfloat16
        scores = torch.matmul(q.to(low).view(b, hkv, -1, qlen, d), k.to(low).unsqueeze(2).transpose(-1, -2))
        probs = scores.float().mul_(d ** -0.5).add_(self._bias).softmax(-1)
        return torch.matmul(probs.to(low), v.to(low).unsqueeze(2)).view(b, hkv, gq, d)


BAND = 8  # completions per attention call in SharedPromptAttention


class SharedPromptAttention:
    """Attention over prompts and the completions that continue them, packed without padding (the
    trainer's forward with train.share_prompts): each prompt is computed once, causally; each
    completion sees its prompt and itself, causally. `prompt_rows` [P, Tp] and `completion_rows`
    [B, Tc] hold the packed indices of each prompt's and completion's tokens (-1 past its end);
    completion b continues prompt `prompt_of[b]`; `positions` [N] are the packed tokens' positions.
    The completions' attention runs in bands of BAND completions of similar length, each padded to
    its own longest (the same attention as one call over all of them, to float32 rounding)."""

    invariant = False

    def __init__(self, prompt_rows: torch.Tensor, completion_rows: torch.Tensor, prompt_of: torch.Tensor,
                 positions: torch.Tensor, num_heads: int, num_kv_heads: int):
        dev = positions.device
        self.positions = positions
        n = positions.numel()
        g = num_heads // num_kv_heads
        pv, cv = prompt_rows >= 0, completion_rows >= 0
        p, tp = prompt_rows.shape
        # Padding reads row n, a zero row appended to the packed tensors.
        self.prompt_index = torch.where(pv, prompt_rows, n).reshape(-1)
        causal = lambda t: torch.ones(t, t, dtype=torch.bool, device=dev).tril()  # noqa: E731
        # Padding queries see their first key only, so no row is empty.
        first = lambda q, k: torch.zeros(q, k, dtype=torch.bool, device=dev).index_fill_(1, torch.tensor([0], device=dev), True)  # noqa: E731
        prompt_mask = (causal(tp)[None] & pv[:, None, :]) | (~pv[:, :, None] & first(tp, tp)[None])
        self.prompts = DenseAttention.over(prompt_mask, g)
        # Completions in bands of BAND, shortest first, each padded to its own longest only: the
        # fused kernel computes every masked key, so one band padded to the longest completion of
        # the micro-batch did about twice the work on the default job's lengths.
        lengths = cv.sum(1)
        order = torch.sort(lengths.cpu(), stable=True).indices.to(dev)
        banded = [(rows, max(1, int(lengths[rows].max()))) for rows in order.split(BAND)]
        # The bands' scores together are what the plain-product path would keep for the backward
        # pass, so MATH_ATTENTION_ELEMENTS caps them together, as it capped the one call before.
        scores = sum(len(rows) * tc * (tp + tc) for rows, tc in banded)
        self.bands = []
        at = p * tp
        back = torch.empty(n + 1, dtype=torch.long, device=dev)
        back[self.prompt_index] = torch.arange(at, device=dev)
        for rows, tc in banded:
            valid, index = cv[rows, :tc], torch.where(cv[rows, :tc], completion_rows[rows, :tc], n).reshape(-1)
            own = causal(tc)[None] & valid[:, None, :]
            mask = torch.cat((pv[prompt_of[rows]][:, None, :].expand(-1, tc, -1), own), dim=2)
            self.bands.append((index, prompt_of[rows], DenseAttention.over(mask, g, scores), len(rows), tc))
            # Packed token i's output sits at row back[i] of the prompts' outputs followed by the bands'.
            back[index] = torch.arange(at, at + len(rows) * tc, device=dev)
            at += len(rows) * tc
        self.back = back[:n]
        self.shapes = (p, tp)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p, tp = self.shapes
        hkv, d = k.shape[1], k.shape[2]
        zero = lambda x: torch.cat((x, x.new_zeros(1, *x.shape[1:])))  # noqa: E731
        q, k, v = zero(q), zero(k), zero(v)
        pk = k.index_select(0, self.prompt_index).view(p, tp, hkv, d)
        pv = v.index_select(0, self.prompt_index).view(p, tp, hkv, d)
        pq = q.index_select(0, self.prompt_index)
        outs = [unfold_output(self.prompts._attend(fold_queries(pq, p, tp, hkv), pk.transpose(1, 2), pv.transpose(1, 2), q.shape[1]), p, tp)]
        for index, prompt_of, attention, b, tc in self.bands:
            ck = torch.cat((pk.index_select(0, prompt_of), k.index_select(0, index).view(b, tc, hkv, d)), dim=1)
            cv = torch.cat((pv.index_select(0, prompt_of), v.index_select(0, index).view(b, tc, hkv, d)), dim=1)
            cq = q.index_select(0, index)
            outs.append(unfold_output(attention._attend(fold_queries(cq, b, tc, hkv), ck.transpose(1, 2), cv.transpose(1, 2), q.shape[1]), b, tc))
        return torch.cat(outs).index_select(0, self.back)
