"""Predicted step times: verification forwards and drafting, from a short profile refined online."""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

Table = dict[tuple[int, int], float]  # (batch, tokens per row or draft length) -> seconds


def interpolate(xs, ys, x: float) -> float:
    """Piecewise-linear through (xs[i], ys[i]) (xs ascending), extrapolating the end segments."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def step_table(measured: dict[int, float], capacity: int) -> list[float]:
    """Seconds per step for batch 0..capacity from measured means per batch size: linear between
    measured sizes, flat beyond them; [0.0] + [1.0] * capacity when nothing is measured."""
    capacity = max(capacity, 1)
    if not measured:
        return [0.0] + [1.0] * capacity
    xs, ys = zip(*sorted(measured.items()))
    out = [0.0]
    for b in range(1, capacity + 1):
        if b in measured:
            out.append(measured[b])
        elif b < xs[0] or b > xs[-1]:
            out.append(ys[0] if b < xs[0] else ys[-1])
        else:
            out.append(interpolate(xs, ys, b))
    return out


class _Grid:
    """A (batch, k) table with its axes sorted once: linear in k, linear in log2(batch).
    Values are memoised: the selector asks for the same few (batch, k) at every step."""

    __slots__ = ("log_batches", "rows", "memo")

    def __init__(self, table: Table):
        batches = sorted({b for b, _ in table})
        self.log_batches = [math.log2(b) for b in batches]
        self.rows = []
        for b in batches:
            ks = sorted(kk for bb, kk in table if bb == b)
            self.rows.append(([float(x) for x in ks], [table[(b, x)] for x in ks]))
        self.memo: dict[tuple[float, float], float] = {}

    def __call__(self, batch: float, k: float) -> float:
        y = self.memo.get((batch, k))
        if y is None:
            if len(self.memo) >= 1 << 16:
                self.memo.clear()
            y = self.memo[(batch, k)] = self._interpolate(batch, k)
        return y

    def _interpolate(self, batch: float, k: float) -> float:
        xs, x = self.log_batches, math.log2(max(batch, 1))
        if len(xs) == 1:
            return max(interpolate(*self.rows[0], k), 1e-6)
        # The two rows around log2(batch) are all the outer interpolation reads.
        i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
        y0, y1 = interpolate(*self.rows[i - 1], k), interpolate(*self.rows[i], k)
        return max(y0 + (y1 - y0) * (x - xs[i - 1]) / (xs[i] - xs[i - 1]), 1e-6)


class CostModel:
    """t_verify(B, q): one policy forward of q tokens per row for B rows; t_draft(drafter, B, n).

    Starts from profiled tables and multiplies each prediction by a correction learned online per
    (drafter or "verify", batch bucket, bucket of q or n): an exponential moving average of
    measured / predicted, so changes in context length, machine load or weights are followed within
    a few steps. A prediction takes the most specific correction measured: its (batch, q) bucket,
    else the nearest shorter bucket measured at that batch (a profile that underprices some rows
    likely underprices longer ones as much), else its batch bucket's, else the kind's overall one.
    For verification the last two learn from plain steps (one token per row) only, and a forward of
    longer rows corrects its own bucket alone: a profile that underprices longer rows relative to
    plain steps (one measured in a bad minute, or extrapolated past the batches it reached) is then
    corrected by the speculative steps themselves without making plain steps look dearer too, which
    would keep the selector from ever trying plain decoding again.
    The tables are fixed once given (their sorted grids are cached); a drafter without a profile
    gets a per-row-token table learned from its first measured step. `smoothing` is each
    observation's weight in the moving average (a bucket's first observation sets it); 0 learns no
    correction, keeping the profiled prices.
    """

    def __init__(self, verify: Table, drafts: dict[str, Table] | None = None, smoothing: float = 0.2):
        self.verify_table = dict(verify)
        self.draft_tables = {k: dict(v) for k, v in (drafts or {}).items()}
        self.smoothing = smoothing
        self.correction: dict[tuple[str, int, int], float] = {}  # (kind, batch bucket, k bucket); 0: any
        self.learned: set[str] = set()  # drafters whose table was learned online, not profiled
        self._grids = {"verify": _Grid(self.verify_table)} | {k: _Grid(v) for k, v in self.draft_tables.items() if v}

    @staticmethod
    def _bucket(x: float) -> int:
        """The power of two at or above x (1 for x <= 1)."""
        return 1 << max(0, math.ceil(x) - 1).bit_length()

    def _keys(self, kind: str, batch: int, k: float) -> tuple[tuple[str, int, int], ...]:
        """The corrections an observation updates: its own bucket, its batch's, the kind's."""
        b = self._bucket(batch)
        return (kind, b, self._bucket(k)), (kind, b, 0), (kind, 0, 0)

    def _fix(self, kind: str, batch: int, k: float) -> float:
        b, kb = self._bucket(batch), self._bucket(k)
        shorter = [(kind, b, kb >> i) for i in range(kb.bit_length())]  # its own bucket, then each shorter one
        return next((self.correction[key] for key in (*shorter, (kind, b, 0), (kind, 0, 0)) if key in self.correction), 1.0)

    def verify(self, batch: int, q: float) -> float:
        """Seconds for a forward of q (mean) new tokens per row over `batch` rows."""
        return self._grids["verify"](batch, q) * self._fix("verify", batch, q)

    def draft(self, drafter: str, batch: int, n: int) -> float:
        """Seconds for `drafter` to propose n tokens for `batch` rows (0 if n is 0)."""
        if n <= 0 or batch <= 0:
            return 0.0
        grid = self._grids.get(drafter)
        base = grid(batch, n) if grid else 2e-5 * batch * n
        return base * self._fix(drafter, batch, n)

    def observe(self, kind: str, batch: int, k: float, seconds: float) -> None:
        """A measured time for `kind` ("verify" or a drafter name) at (batch, k)."""
        if seconds <= 0 or batch <= 0:
            return
        grid = self._grids.get(kind)
        if grid is None:
            # No profile for this drafter: learn its per-row-token cost directly.
            rows = batch * max(k, 1)
            self._set_draft_table(kind, {(1, 1): seconds / rows, (64, 1): 64 * seconds / rows})
            self.learned.add(kind)
            return
        if not self.smoothing:  # the profiled prices, kept as given
            return
        ratio = seconds / grid(batch, k)
        keys = self._keys(kind, batch, k)
        if kind == "verify" and self._bucket(k) > 1:
            keys = keys[:1]
        for key in keys:
            old = self.correction.get(key, ratio)
            self.correction[key] = old + self.smoothing * (ratio - old)

    def _set_draft_table(self, drafter: str, table: Table) -> None:
        self.draft_tables[drafter] = table
        self._grids[drafter] = _Grid(table)

    def state_dict(self) -> dict:
        """What was learned online (corrections, tables of unprofiled drafters), as plain JSON."""
        return {
            "correction": [[kind, batch, k, v] for (kind, batch, k), v in sorted(self.correction.items())],
            "learned": {k: _encode(self.draft_tables[k]) for k in sorted(self.learned)},
        }

    def load_state_dict(self, state: dict) -> None:
        # Rows of three (kind, batch bucket, value) come from runs before corrections were kept per q.
        self.correction = {(str(row[0]), int(row[1]), int(row[2]) if len(row) == 4 else 0): float(row[-1])
                           for row in state.get("correction", [])}
        for name, rows in state.get("learned", {}).items():
            self._set_draft_table(name, _decode(rows))
            self.learned.add(name)

    def to_json(self) -> dict:
        return {"verify": _encode(self.verify_table), "drafts": {k: _encode(v) for k, v in self.draft_tables.items()}}

    @classmethod
    def from_json(cls, data: dict) -> CostModel:
        return cls(_decode(data["verify"]), {k: _decode(v) for k, v in data.get("drafts", {}).items()})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> CostModel:
        return cls.from_json(json.loads(path.read_text()))


def _encode(table: Table) -> list[list]:
    return [[b, k, s] for (b, k), s in sorted(table.items())]


def _decode(rows: list[list]) -> Table:
    return {(int(b), int(k)): float(s) for b, k, s in rows}
