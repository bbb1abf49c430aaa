"""Predicted step times: verification forwards and drafting, from a short profile refined online."""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

Table = dict[tuple[int, int], float]  # (batch, tokens per row or draft length) -> seconds


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), extrapolating the end segments."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def lookup(table: Table, batch: float, k: float) -> float:
    """Interpolate a (batch, k) grid: linear in k, linear in log2(batch)."""
    batches = sorted({b for b, _ in table})
    per_batch = []
    for b in batches:
        ks = sorted(kk for bb, kk in table if bb == b)
        per_batch.append(_interp([float(x) for x in ks], [table[(b, x)] for x in ks], k))
    return max(_interp([math.log2(b) for b in batches], per_batch, math.log2(max(batch, 1))), 1e-6)


class CostModel:
    """t_verify(B, q): one policy forward of q tokens per row for B rows; t_draft(drafter, B, n).

    Starts from profiled tables and multiplies each prediction by a correction learned online per
    (drafter or "verify", batch bucket): an exponential moving average of measured / predicted,
    so changes in context length, machine load or weights are followed within a few steps.
    """

    def __init__(self, verify: Table, drafts: dict[str, Table] | None = None, smoothing: float = 0.2):
        self.verify_table = dict(verify)
        self.draft_tables = {k: dict(v) for k, v in (drafts or {}).items()}
        self.smoothing = smoothing
        self.correction: dict[tuple[str, int], float] = {}

    @staticmethod
    def _bucket(batch: int) -> int:
        return 1 << max(0, (batch - 1).bit_length())

    def _fix(self, kind: str, batch: int) -> float:
        return self.correction.get((kind, self._bucket(batch)), self.correction.get((kind, 0), 1.0))

    def verify(self, batch: int, q: float) -> float:
        """Seconds for a forward of q (mean) new tokens per row over `batch` rows."""
        return lookup(self.verify_table, batch, q) * self._fix("verify", batch)

    def draft(self, drafter: str, batch: int, n: int) -> float:
        """Seconds for `drafter` to propose n tokens for `batch` rows (0 if n is 0)."""
        if n <= 0 or batch <= 0:
            return 0.0
        table = self.draft_tables.get(drafter)
        base = lookup(table, batch, n) if table else 2e-5 * batch * n
        return base * self._fix(drafter, batch)

    def observe(self, kind: str, batch: int, k: float, seconds: float) -> None:
        """A measured time for `kind` ("verify" or a drafter name) at (batch, k)."""
        if seconds <= 0 or batch <= 0:
            return
        table = self.verify_table if kind == "verify" else self.draft_tables.get(kind)
        if kind != "verify" and not table:
            # No profile for this drafter: learn its per-row-token cost directly.
            self.draft_tables[kind] = {(1, 1): seconds / (batch * max(k, 1)), (64, 1): 64 * seconds / (batch * max(k, 1))}
            return
        ratio = seconds / lookup(table, batch, k)
        for key in ((kind, self._bucket(batch)), (kind, 0)):
            old = self.correction.get(key, ratio)
            self.correction[key] = old + self.smoothing * (ratio - old)

    def to_json(self) -> dict:
        enc = lambda t: [[b, k, s] for (b, k), s in sorted(t.items())]  # noqa: E731
        return {"verify": enc(self.verify_table), "drafts": {k: enc(v) for k, v in self.draft_tables.items()}}

    @classmethod
    def from_json(cls, data: dict) -> CostModel:
        dec = lambda rows: {(int(b), int(k)): float(s) for b, k, s in rows}  # noqa: E731
        return cls(dec(data["verify"]), {k: dec(v) for k, v in data.get("drafts", {}).items()})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> CostModel:
        return cls.from_json(json.loads(path.read_text()))
