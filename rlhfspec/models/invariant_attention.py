"""The batch-invariant attention kernel and its verification.

`attend_block` computes softmax attention for E entries of M query rows over L padded keys, in
products of fixed shapes (keys in blocks, added in order). Which query-row counts, key padding
step and block size keep a row's bits unchanged whatever the padding and the call's other rows
and entries depends on the CPU's kernels, so `attention_layout` measures it once per machine on
probes built to expose reduction-order differences, and `check_length` verifies each longer
padded length the first time it is used.
"""

from __future__ import annotations

import math

import torch

from rlhfspec.errors import RlhfspecError
from rlhfspec.models.invariance import VERDICTS, RowPlan, plan_rows

BLOCKS = (512, 256, 128, 64)  # candidate keys per product call, fewest calls first (64 with step 64: every call one shape)
STEPS = (64, 128, 256)  # candidate key paddings, finest first (see attention_layout)


def attend_block(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, block: int, serial: bool = False) -> torch.Tensor:
    """Softmax attention whose rows do not depend on their call: q [E, M, D] (already scaled),
    keys, values [E, L, D], bias [E, M, L] or broadcastable (0 where visible, -inf where not;
    every row sees at least one key) -> [E, M, D]. The value product reduces over `block` keys
    at a time, adding the blocks in order. `serial` runs the products on one thread (where the
    library splits a reduction across threads, as MKL's AVX2 kernels do).

    torch's fused kernel (scaled_dot_product_attention) is not used here: in bf16 its rows
    change bits with the padded length (found with the cancelling probe below), and in float32
    it was no faster than this on the reference CPU."""
    if serial:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return attend_block(q, keys, values, bias, block)
        finally:
            torch.set_num_threads(threads)
    length = keys.shape[1]
    if length <= block:
        p = torch.softmax(torch.bmm(q, keys.transpose(1, 2)).add_(bias), dim=-1, dtype=torch.float32)
        return torch.bmm(p.to(q.dtype), values)
    # Scores and the value product per block of keys, so each product's shape is the block's.
    scores = torch.cat([torch.bmm(q, keys[:, j : j + block].transpose(1, 2)) for j in range(0, length, block)], dim=-1)
    p = torch.softmax(scores.add_(bias), dim=-1, dtype=torch.float32).to(q.dtype)
    out = None
    for j in range(0, length, block):
        part = torch.bmm(p[:, :, j : j + block], values[:, j : j + block]).float()
        out = part if out is None else out + part
    return out.to(q.dtype)


def visible_bias(seen: torch.Tensor, dtype) -> torch.Tensor:
    """0 where seen, -inf elsewhere, in dtype."""
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, float("-inf"))


def attention_layout(dtype: torch.dtype, device, head_dim: int) -> tuple[RowPlan, int, int, bool]:
    """(query-row counts per entry, key padding step, keys per value-product call, one thread)
    for which `attend_block` gives every row the same bits, verified once per machine: the first
    layout (threads as they are before one thread; then the finest step of STEPS; then the largest
    block of BLOCKS) whose rows come out the same over every padded length up to twice the block
    and whose tile holds at least GOOD_TILE rows; else the one with the largest tile. Longer
    lengths are checked by `check_length` as they come."""
    key = f"attention d={head_dim} {dtype} {device}"
    verdict = VERDICTS.get(key, lambda: _layout(dtype, torch.device(device), head_dim))
    if verdict is None:
        raise RlhfspecError(f"no batch-invariant attention was found for head_dim {head_dim} in {dtype} on this machine; use batch_invariant=False.")
    return RowPlan(tuple(verdict["sizes"])), verdict["step"], verdict["block"], verdict["serial"]


GOOD_TILE = 16
SPAN = 1024  # padded lengths verified up front (longer ones as they come, by check_length)


def _layout(dtype, device, head_dim: int) -> dict | None:
    best = None
    for serial in (False, True):
        for step in STEPS:
            for block in BLOCKS:
                x, keys, values = _probe(dtype, device, head_dim, step, 64, seed=0)
                plan = plan_rows(_row_fn(keys, values, dtype, block, serial), x)
                if plan is None or (best is not None and plan.tile <= best["sizes"][-1]):
                    continue
                if all(_length_ok(dtype, device, head_dim, n, step, block, serial, plan) for n in range(step, max(2 * block, SPAN) + 1, step)):
                    best = {"sizes": list(plan.sizes), "step": step, "block": block, "serial": serial}
                    if plan.tile >= GOOD_TILE:
                        return best
    return best


def check_length(dtype, device, head_dim: int, length: int) -> None:
    """Verify (once per machine) that rows at every verified query-row count come out the same
    over `length` padded keys as over the shortest padding that holds their visible keys, in a
    call of one entry or of several."""
    plan, step, block, serial = attention_layout(dtype, device, head_dim)
    key = f"attention-length d={head_dim} step={step} block={block} serial={serial} L={length} {dtype} {device}"
    if not VERDICTS.get(key, lambda: _length_ok(dtype, torch.device(device), head_dim, length, step, block, serial, plan)):
        raise RlhfspecError(
            f"attention over {length} keys (head_dim {head_dim}, {dtype}) is not batch-invariant on this machine; use batch_invariant=False."
        )


def _probe(dtype, device, head_dim: int, length: int, rows: int, seed: int):
    """Random queries (with each row's visible key count in its last column), keys and values.

    Keys come in equal pairs and values in pairs of large opposite parts (+-2^10 u plus noise):
    each pair's large parts cancel exactly, but how much of the rest a large partial sum
    absorbs depends on the order of the reduction, so two orders that differ in the last
    float32 bits still round to different bf16 outputs."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, head_dim, generator=gen) / math.sqrt(head_dim)
    seen = torch.randint(1, length + 1, (rows, 1), generator=gen).float()
    keys = torch.randn(1, length, head_dim, generator=gen)
    keys[:, 1::2] = keys[:, 0::2][:, : keys[:, 1::2].shape[1]]
    big = 2.0**10 * torch.randn(1, (length + 1) // 2, head_dim, generator=gen).to(dtype).float()
    values = torch.randn(1, length, head_dim, generator=gen)
    values[:, 0::2] += big
    values[:, 1::2] -= big[:, : values[:, 1::2].shape[1]]
    return torch.cat((q, seen), dim=1).to(device), keys.to(dtype=dtype, device=device), values.to(dtype=dtype, device=device)


def _bias(x: torch.Tensor, length: int, dtype) -> torch.Tensor:
    return visible_bias(torch.arange(length, device=x.device)[None, None, :] < x[:, -1:].long()[None], dtype)


def _row_fn(keys: torch.Tensor, values: torch.Tensor, dtype, block: int, serial: bool):
    """x [M, D+1] (query, visible keys) -> attention rows [M, D] over one entry's keys."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return attend_block(x[:, :-1].to(dtype)[None], keys, values, _bias(x, keys.shape[1], dtype), block, serial)[0]

    return fn


def _length_ok(dtype, device, head_dim: int, length: int, step: int, block: int, serial: bool, plan: RowPlan) -> bool:
    x, keys, values = _probe(dtype, device, head_dim, length, plan.tile, seed=length)
    full = _row_fn(keys, values, dtype, block, serial)(x)
    # Each row against the shortest padding that holds its keys.
    shortest = (x[:, -1].long() + step - 1) // step * step
    for cut in shortest.unique().tolist():
        sel = shortest == cut
        rows = x[sel]
        padded = plan.padded(len(rows))  # a verified call size, filled with copies of the first row
        call = torch.cat((rows, rows[:1].expand(padded - len(rows), -1))) if padded > len(rows) else rows
        short = _row_fn(keys[:, :cut].contiguous(), values[:, :cut].contiguous(), dtype, block, serial)(call)[: len(rows)]
        if not torch.equal(short, full[sel]):
            return False
    fn = _row_fn(keys, values, dtype, block, serial)
    if not all(torch.equal(fn(x[plan.tile - m :]), full[plan.tile - m :]) for m in plan.sizes):
        return False
    # The same rows as entry 1 of a three-entry call over a longer cache (as the engine's views are).
    others = torch.randn(3, 2 * length, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=device)
    k3, v3 = others.clone(), others.flip(0).clone()
    k3[1, :length], v3[1, :length] = keys[0], values[0]
    q3 = x[:, :-1].to(dtype)[None].expand(3, -1, -1).contiguous()
    return torch.equal(attend_block(q3, k3[:, :length], v3[:, :length], _bias(x, length, dtype).expand(3, -1, -1), block, serial)[1], full)
