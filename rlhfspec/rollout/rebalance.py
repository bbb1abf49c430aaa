"""Which in-flight samples to move between generation instances: pure decisions over plain data."""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(slots=True)
class SampleLoad:
    sample_id: int
    context_len: int  # tokens whose KV the instance holds (prompt + generated)
    remaining: float  # predicted tokens still to generate


@dataclass(slots=True)
class InstanceLoad:
    """One instance as the coordinator sees it: its live samples, free slots, and costs.

    step_seconds[b] is the predicted time of one step at live batch b (index 0 unused);
    tokens_per_step is what one step emits per sample (above 1 with speculation)."""

    instance: int
    samples: list[SampleLoad]
    free_slots: int
    step_seconds: list[float]
    tokens_per_step: float = 1.0
    prefill_seconds_per_token: float = 1e-3
    kv_bytes_per_token: float = 0.0
    link_bytes_per_second: float = 1e9
    link_latency: float = 1e-3


@dataclass(slots=True)
class Move:
    sample_id: int
    source: int
    destination: int
    ship_kv: bool  # True: send the KV rows; False: the destination recomputes them
    gain_s: float  # predicted makespan reduction, after the move's own cost


def finish_time(step_seconds: list[float], remaining_steps: list[float], extra: float = 0.0) -> float:
    """Seconds until an instance's last sample finishes: its batch shrinks as samples finish,
    so time = sum over k of (r_(k) - r_(k-1)) * t(batch still live), r sorted ascending."""
    if not remaining_steps:
        return extra
    rs = sorted(remaining_steps)
    total, prev, live = extra, 0.0, len(rs)
    for r in rs:
        total += (r - prev) * _t(step_seconds, live)
        prev, live = r, live - 1
    return total


def _t(step_seconds: list[float], batch: int) -> float:
    if batch <= 0:
        return 0.0
    return step_seconds[min(batch, len(step_seconds) - 1)]


def migration_cost(sample: SampleLoad, src: InstanceLoad, dst: InstanceLoad) -> tuple[float, bool]:
    """(seconds, ship_kv): the cheaper of sending the KV rows and recomputing them at the destination."""
    transfer = src.link_latency + sample.context_len * src.kv_bytes_per_token / src.link_bytes_per_second
    recompute = sample.context_len * dst.prefill_seconds_per_token
    return (transfer, True) if transfer <= recompute else (recompute, False)


class Rebalancer:
    """Move long-running samples from the instance predicted to finish last to the one predicted to
    finish first, while each move shortens the predicted makespan by more than `min_gain` seconds
    after paying its migration cost. A sample moves at most once per `cooldown` decisions and
    never back to an instance it left (no ping-pong); destinations keep a free slot per move."""

    def __init__(self, min_gain: float = 0.05, cooldown: int = 1_000_000, max_moves: int = 8):
        self.min_gain, self.cooldown, self.max_moves = min_gain, cooldown, max_moves
        self.decisions = 0
        self.last_moved: dict[int, int] = {}
        self.left: dict[int, set[int]] = {}

    def plan(self, loads: list[InstanceLoad]) -> list[Move]:
        self.decisions += 1
        if len(loads) < 2:
            return []
        state = {l.instance: [s for s in l.samples] for l in loads}
        free = {l.instance: l.free_slots for l in loads}
        extra = {l.instance: 0.0 for l in loads}
        by_id = {l.instance: l for l in loads}

        def finish(i: int) -> float:
            l = by_id[i]
            return finish_time(l.step_seconds, [s.remaining / l.tokens_per_step for s in state[i]], extra[i])

        moves: list[Move] = []
        while len(moves) < self.max_moves:
            times = {i: finish(i) for i in state}
            src = max(times, key=times.get)
            dst = min((i for i in state if i != src and free[i] > 0), key=times.get, default=None)
            # The longest movable sample of the slowest instance is the candidate that matters.
            s = None if dst is None else next((x for x in sorted(state[src], key=lambda x: -x.remaining) if self._movable(x, dst)), None)
            best = None
            if s is not None:
                cost, ship = migration_cost(s, by_id[src], by_id[dst])
                before = max(times.values())
                state[src].remove(s)
                state[dst].append(s)
                extra[dst] += cost
                after = max(finish(i) for i in state)
                state[dst].remove(s)
                state[src].append(s)
                extra[dst] -= cost
                if before - after > self.min_gain:
                    best = Move(s.sample_id, src, dst, ship, before - after)
            if best is None:
                break
            s = next(x for x in state[src] if x.sample_id == best.sample_id)
            state[src].remove(s)
            state[best.destination].append(s)
            extra[best.destination] += migration_cost(s, by_id[src], by_id[best.destination])[0]
            free[best.destination] -= 1
            free[src] += 1
            self.last_moved[s.sample_id] = self.decisions
            self.left.setdefault(s.sample_id, set()).add(src)
            moves.append(best)
        return moves

    def _movable(self, s: SampleLoad, dst: int) -> bool:
        """Not moved within the cooldown, and never back to an instance it left."""
        return self.decisions - self.last_moved.get(s.sample_id, -10**9) >= self.cooldown and dst not in self.left.get(s.sample_id, ())


class LengthPredictor:
    """Predicted remaining tokens of a sample from the lengths of samples already finished:
    E[L - l | L > l] over them; before enough have finished, half of what max_new_tokens allows."""

    def __init__(self, max_new_tokens: int, min_observations: int = 4):
        self.max_new_tokens, self.min_observations = max_new_tokens, min_observations
        self.finished: list[int] = []

    def observe(self, length: int) -> None:
        bisect.insort(self.finished, length)

    def remaining(self, generated: int) -> float:
        cap = self.max_new_tokens - generated
        i = bisect.bisect_right(self.finished, generated)
        longer = self.finished[i:]
        if len(self.finished) < self.min_observations or not longer:
            return max(1.0, cap / 2)
        return max(1.0, min(cap, sum(longer) / len(longer) - generated))
