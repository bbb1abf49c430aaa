"""Batch invariance: the same bits for a row whatever else shares its kernel call.

A library GEMM picks its algorithm by the call's shape: MKL's sgemm has separate kernels for one,
two and three rows, splits the reduction differently at some sizes, and oneDNN switches
algorithms past 32 rows in bfloat16. Which shapes share an algorithm differs from CPU to CPU
(AVX-512 vs AVX2, Intel vs AMD). So invariance here is not assumed but measured: a row function
is run once, at start-up, on every call size up to a tile, and only sizes whose rows come out
bitwise equal to the canonical tile's (at any position in the call, on one thread or several)
are used. Inputs are then cut into calls of those sizes, padding the last one up to the next
verified size. The same set of sizes serves every instance on the machine, so a row's bits do
not depend on its batch, slot, instance, or on being recomputed after a migration.

Elementwise transcendental ops (exp, silu) have the same hazard in a different place: ATen runs
whole vectors through SLEEF and the tail of a range through libm, and a parallel split moves the
range boundaries with the tensor's size. `rowwise` runs such ops over row blocks small enough to
stay on one thread, so a row's elements always take the same path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhfspec.models.hardware import cpu_flags, cpu_model, cpu_vendor
from rlhfspec.paths import default_cache_dir

RowFn = Callable[[torch.Tensor], torch.Tensor]
MAX_TILE = 64  # the largest call size verified (and so the most rows one call takes)
CALL_ROWS = 8  # what one more call costs, in rows (small-batch products are bound by reading the weight)
_SERIAL = 32767  # ATen runs an elementwise op on one thread below 32768 elements (at::internal::GRAIN_SIZE)


@dataclass(frozen=True, slots=True)
class RowPlan:
    """Call sizes (rows) that give every row the same bits; `tile` is the largest."""

    sizes: tuple[int, ...]

    @property
    def tile(self) -> int:
        return self.sizes[-1]

    def padded(self, rows: int) -> int:
        """The call size that serves `rows` (<= tile) rows: the smallest verified size >= rows."""
        return next(s for s in self.sizes if s >= rows)

    def calls(self, rows: int) -> list[tuple[int, int, int]]:
        """(start, rows, call size) for each call that covers `rows` rows in order."""
        out, start = [], 0
        while start < rows:
            n = min(self.tile, rows - start)
            out.append((start, n, self.padded(n)))
            start += n
        return out


def apply_rows(fn: RowFn, plan: RowPlan, x: torch.Tensor) -> torch.Tensor:
    """fn over the rows of x [N, ...] in calls of verified sizes; returns fn's rows [N, ...]."""
    n = x.shape[0]
    if n <= plan.tile and plan.padded(n) == n:
        return fn(x)
    out = None
    for start, rows, size in plan.calls(n):
        part = x[start : start + rows]
        if size > rows:
            part = torch.cat((part, part.new_zeros(size - rows, *part.shape[1:])))
        y = fn(part)
        if out is None:
            out = y.new_empty(n, *y.shape[1:])
        out[start : start + rows] = y[:rows]
    return out


def plan_rows(fn: RowFn, probe: torch.Tensor, max_tile: int = MAX_TILE) -> RowPlan | None:
    """The call sizes for which fn's rows are bitwise those of a canonical call, or None.

    probe: [max_tile, ...] rows of representative input. Every size 1..max_tile is run (on the
    last `size` rows of probe). Each power of two T is a candidate canonical call: its size class
    is the sizes whose rows equal T's; T qualifies if its rows do not move when the call's rows
    are rotated, do not change when the other rows hold other data, and do not depend on the
    thread count. Of the qualifying T, the one whose class
    wastes least wins, the larger on ties: the worst, over every row count n, of the rows computed
    (padding included) plus CALL_ROWS per call, over n + CALL_ROWS.
    """
    outs = {m: fn(probe[max_tile - m :]) for m in range(1, max_tile + 1)}
    best: tuple[float, RowPlan] | None = None
    tile = 1 << (max_tile.bit_length() - 1)
    while tile >= 1:
        ref = outs[tile]
        plan = RowPlan(tuple(m for m in range(1, tile + 1) if torch.equal(outs[m], ref[tile - m :])))
        waste = max(sum(size + CALL_ROWS for _, _, size in plan.calls(n)) / (n + CALL_ROWS) for n in range(1, max_tile + 1))
        x = probe[max_tile - tile :]
        if (best is None or waste < best[0]) and _rotation_invariant(fn, x, ref) and _companion_invariant(fn, x, ref) \
                and _thread_invariant(fn, x, ref):
            best = (waste, plan)
        tile //= 2
    return None if best is None else best[1]


def cancelling_probe(rows: int, weight: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [rows, K], w) for verifying a product x @ w.T: w with two pairs of equal columns, x
    with large opposite values on each pair. The pairs cancel exactly, but how much of the other
    terms a large partial sum absorbs depends on the order of the reduction, so two orders that
    differ only in the last float32 bits still round to different bf16 outputs."""
    k = weight.shape[1]
    w = weight.clone()
    x = torch.randn(rows, k, generator=gen)
    for (a, b), big in (((0, k - 1), 2.0**17), ((k // 3, (2 * k) // 3), 2.0**10)):
        w[:, b] = w[:, a]
        x[:, a], x[:, b] = big, -big
    return x.to(dtype=weight.dtype, device=weight.device), w


def _rotation_invariant(fn: RowFn, x: torch.Tensor, ref: torch.Tensor) -> bool:
    shift = max(1, x.shape[0] // 2 + 1)
    return torch.equal(fn(x.roll(shift, 0)), ref.roll(shift, 0))


def _companion_invariant(fn: RowFn, x: torch.Tensor, ref: torch.Tensor) -> bool:
    """The even rows keep their bits when the odd rows hold other data."""
    if x.shape[0] < 2:
        return True
    other = x.clone()
    other[1::2] = x.flip(0)[1::2] * 0.5
    return torch.equal(fn(other)[0::2], ref[0::2])


def _thread_invariant(fn: RowFn, x: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same bits on one thread and on two or more (Ray actors run with one)."""
    if x.device.type != "cpu":
        return True
    threads = torch.get_num_threads()
    try:
        for t in {1, max(2, threads)} - {threads}:
            torch.set_num_threads(t)
            if not torch.equal(fn(x), ref):
                return False
    finally:
        torch.set_num_threads(threads)
    return True


def rowwise_(fn_: Callable[[torch.Tensor], object], x: torch.Tensor) -> torch.Tensor:
    """An in-place elementwise op (like F.silu(., inplace=True)) over x's rows in the blocks
    `rowwise` uses; returns x."""
    if x.device.type != "cpu":
        fn_(x)
        return x
    for i in range(0, x.shape[0], _rows_per_call(x)):
        fn_(x[i : i + _rows_per_call(x)])
    return x


def _rows_per_call(x: torch.Tensor) -> int:
    w = x[0].numel() if x.shape[0] else 1
    return max(1, _SERIAL // w) if w % 64 == 0 else 1


def rowwise(fn: RowFn, x: torch.Tensor) -> torch.Tensor:
    """fn (elementwise along the last dim) over x [N, W] in row blocks that ATen runs on one
    thread, each starting at a row boundary, so every row's elements take the same code path.

    With W a multiple of 64 any block works (rows start on a vector boundary); otherwise each
    call takes one row. A row wider than one thread's share is run alone, so every call has the
    same shape and the same parallel split.
    """
    if x.device.type != "cpu":
        return fn(x)
    n, per_call = x.shape[0], _rows_per_call(x)
    if n <= per_call:
        return fn(x)
    return torch.cat([fn(x[i : i + per_call]) for i in range(0, n, per_call)])


VERDICT_FORMAT = 11  # bump when what a verdict holds or how it is checked changes
_ISA_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_DEBUG_CPU_TYPE")


def machine_key() -> str:
    """What a kernel verdict depends on: the CPU, torch (and the MKL / oneDNN inside it), the
    instruction-set limits in the environment and the thread count."""
    return _machine_key(tuple(os.environ.get(k) for k in _ISA_ENV), torch.get_num_threads())


@functools.cache
def _machine_key(env: tuple, threads: int) -> str:
    parts = [VERDICT_FORMAT, cpu_vendor(), cpu_model(), sorted(cpu_flags()), torch.__version__, env, threads]
    if torch.cuda.is_available():
        parts.append([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


class Verdicts:
    """Kernel verdicts (JSON values by string key) remembered on disk per machine key, so a
    verification that takes seconds (the 49k-row output layer) runs once per machine."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.memory: dict[str, object] = {}

    def get(self, key: str, compute: Callable[[], object]):
        """The verdict stored under key, computing (and storing) it the first time."""
        mkey = f"{machine_key()}:{key}"
        if mkey not in self.memory:
            stored = self._load()
            if key not in stored:
                stored[key] = compute()
                self._save(key, stored[key])
            self.memory[mkey] = stored[key]
        return self.memory[mkey]

    def _file(self) -> Path:
        return self.path or default_cache_dir() / "kernels" / f"{machine_key()}.json"

    def _load(self) -> dict:
        try:
            return json.loads(self._file().read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, key: str, value) -> None:
        path = self._file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stored = self._load()  # another process may have added verdicts meanwhile
            stored[key] = value
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stored, indent=0, sort_keys=True))
            tmp.replace(path)
        except OSError:
            pass  # a read-only cache only costs the verification again next time


VERDICTS = Verdicts()
