"""Several generation instances: sharding, refilling, reallocation of in-flight samples, recovery."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from rlhfspec.engine.report import Migrant
from rlhfspec.engine.progress import Progress
from rlhfspec.engine.sequence import Sequence
from rlhfspec.errors import RlhfspecError
from rlhfspec.rollout.backend import Backend
from rlhfspec.rollout.rebalance import InstanceLoad, LengthPredictor, Move, Rebalancer, SampleLoad
from rlhfspec.strategy.cost_model import step_table


@dataclass
class Timeline:
    """(seconds since start, instance, live samples) after every report; and every move made."""

    points: list[tuple[float, int, int]] = field(default_factory=list)
    moves: list[tuple[float, Move]] = field(default_factory=list)
    busy_s: dict[int, float] = field(default_factory=dict)


class Coordinator:
    """The one driver of generation: K >= 1 instances behind a Backend, fed from one queue,
    with samples moved between them by the rebalancer (K = 1 is the ordinary `generate`).

    Every sample comes back exactly once: the coordinator owns the queue and the record of
    where each sample lives, and samples of an instance that fails are resubmitted from their
    last reported state (recomputed elsewhere; the keyed sampling makes them continue as before).
    """

    def __init__(self, backend: Backend, rebalancer: Rebalancer | None = None, steps_per_call: int = 4,
                 mode: str = "auto", max_new_tokens: int = 256, forced_moves=None, progress: bool = False,
                 clock: Callable[[], float] = time.perf_counter):
        if mode not in ("auto", "kv", "recompute"):
            raise RlhfspecError(f"migration mode {mode!r} is not auto, kv or recompute.")
        self.backend, self.rebalancer, self.steps_per_call, self.mode = backend, rebalancer, steps_per_call, mode
        # Measured once: only moves need it, and one instance never moves anything.
        self.link = backend.link() if backend.size > 1 and (rebalancer is not None or forced_moves is not None) else (1e9, 1e-3)
        self.predictor = LengthPredictor(max_new_tokens)
        self.forced_moves = forced_moves  # tests: a callable(reports) -> list[Move] used instead of the rebalancer
        self.timeline = Timeline()
        self.progress = progress
        self.clock = clock  # seconds; the simulator's backend passes its simulated clock

    def run(self, seqs: list[Sequence]) -> list[Sequence]:
        start = self.clock()
        bar = Progress(total=len(seqs), enabled=self.progress, desc=f"generate x{self.backend.size}")
        shown = 0
        queue = deque(seqs)
        where: dict[int, int] = {}
        done: dict[int, Sequence] = {}
        reports = {}
        k = self.backend.size
        for i in range(k):
            reports[i] = self.backend.report(i)
        self._fill(queue, where, reports, done)
        while len(done) < len(seqs):
            if not queue and not where:
                missing = sorted({s.sample_id for s in seqs} - set(done))
                raise RlhfspecError(f"samples {missing[:5]} are neither queued, running nor finished; the rollout lost them.")
            progressed = False
            for i, report in self.backend.run_round(self.steps_per_call):
                progressed = True
                if report is None:  # the instance died: resubmit its samples from their last snapshots
                    self._recover(i, where, reports, queue)
                    continue
                reports[i] = report
                self.timeline.busy_s[i] = self.timeline.busy_s.get(i, 0.0) + report.busy_s
                self.timeline.points.append((self.clock() - start, i, len(report.live)))
                for s in report.finished:
                    if s.sample_id in done:
                        raise RlhfspecError(f"sample {s.sample_id} finished twice; the coordinator lost track of it.")
                    done[s.sample_id] = s
                    where.pop(s.sample_id, None)
                    self.predictor.observe(len(s.tokens))
            if not progressed and not queue:
                raise RlhfspecError(f"samples {sorted(where)[:5]} are placed but no instance is running them.")
            self._fill(queue, where, reports, done)
            if not queue:
                self._reallocate(reports, where, start)
            if self.progress:
                tokens = sum(len(s.tokens) for s in done.values()) + sum(len(s.tokens) for r in reports.values() for s in r.live)
                bar.update(len(done) - shown, tokens, self.clock() - start)
                shown = len(done)
        bar.close()
        return [done[s.sample_id] for s in seqs]

    def _fill(self, queue: deque, where: dict, reports: dict, done: dict) -> None:
        """Hand queued samples to instances with free slots, emptiest first. Samples that already
        generated tokens (recovered from a failed instance) are adopted and their KV recomputed."""
        for i in sorted(reports, key=lambda i: -reports[i].free_slots):
            if self.backend.busy(i):
                continue  # a report is in flight: its free slots are not known yet
            free = reports[i].free_slots
            batch = [queue.popleft() for _ in range(min(free, len(queue)))]
            if not batch:
                continue
            fresh = [s for s in batch if not s.tokens]
            resumed = [Migrant(s) for s in batch if s.tokens]
            finished = self.backend.add(i, fresh) if fresh else []
            if resumed:
                self.backend.adopt(i, resumed)
            for s in batch:
                where[s.sample_id] = i
            for s in finished:
                done[s.sample_id] = s
                where.pop(s.sample_id, None)
                self.predictor.observe(len(s.tokens))
            reports[i] = self.backend.report(i)

    def _loads(self, reports: dict) -> list[InstanceLoad]:
        loads = []
        # An instance that has not stepped yet borrows what the others measured (they run the same spec).
        pooled: dict[int, list[float]] = {}
        for r in reports.values():
            for b, t in r.step_seconds.items():
                pooled.setdefault(b, []).append(t)
        pooled_means = {b: sum(ts) / len(ts) for b, ts in pooled.items()}
        for i, r in reports.items():
            steps = step_table(r.step_seconds or pooled_means, len(r.live) + r.free_slots)
            samples = [SampleLoad(s.sample_id, s.length, self.predictor.remaining(len(s.tokens))) for s in r.live]
            measured = {"prefill_seconds_per_token": r.prefill_seconds_per_token, "kv_bytes_per_token": r.kv_bytes_per_token or None}
            loads.append(InstanceLoad(i, samples, r.free_slots, steps, r.tokens_per_step,
                                      link_bytes_per_second=self.link[0], link_latency=self.link[1],
                                      **{k: v for k, v in measured.items() if v}))
        return loads

    def _reallocate(self, reports: dict, where: dict, start: float) -> None:
        if self.forced_moves is not None:
            moves = self.forced_moves(reports)
        elif self.rebalancer is not None and len(reports) > 1:
            moves = self.rebalancer.plan(self._loads(reports))
        else:
            return
        for m in moves:
            if self.backend.busy(m.source) or self.backend.busy(m.destination):
                continue  # a report is in flight; decide again when it is back
            ship = m.ship_kv if self.mode == "auto" else self.mode == "kv"
            migrants = self.backend.export(m.source, [m.sample_id], ship)
            self.backend.adopt(m.destination, migrants)
            where[m.sample_id] = m.destination
            self.timeline.moves.append((self.clock() - start, m))
        if moves:
            for i in {m.source for m in moves} | {m.destination for m in moves}:
                reports[i] = self.backend.report(i)

    def _recover(self, i: int, where: dict, reports: dict, queue: deque) -> None:
        lost = [s for s in reports[i].live if where.get(s.sample_id) == i]
        self.backend.restart(i)
        reports[i] = self.backend.report(i)
        for s in lost:
            where.pop(s.sample_id, None)
        # Back of the line with what they had generated by the last report; the rest is recomputed.
        queue.extend(lost)

