"""Simulated generation instances behind the coordinator's Backend contract.

A `SimInstance` does what `GenerationInstance` does at every step (asks its real strategy for a
decision on the same Workload, clips draft lengths the same way, records the same StepRecord
and feeds it back to the strategy) but draws accepted drafts from an acceptance profile, takes
each sample's length from the workload, and advances a simulated clock by the cost model's
seconds instead of running a forward. `SimBackend` is a discrete-event version of the Ray backend:
instances step concurrently, each on its own clock, and the coordinator hears from whichever
finishes its steps first, so the real `Coordinator` (and through it the real `Rebalancer`, length
predictor and migration choice) drives the simulation unchanged.
"""

from __future__ import annotations

import time
from typing import Iterator

from rlhfspec.engine.report import InstanceReport, InstanceStats, Migrant
from rlhfspec.engine.sequence import Sequence, prefill_leaders
from rlhfspec.errors import RlhfspecError
from rlhfspec.sim.cost import StepCost
from rlhfspec.sim.workload import AcceptanceProfile
from rlhfspec.strategy.base import StepRecord, Strategy, Workload, clipped_draft_lengths


class SimInstance:
    """Up to `max_batch` live samples; sample s finishes after `targets[s]` tokens (or at
    max_new_tokens). `clock` is the simulated time this instance is next free."""

    def __init__(self, cost: StepCost, max_batch: int, targets: dict[int, int], acceptance: AcceptanceProfile,
                 drafters: list[str] | None = None, strategy: Strategy | None = None):
        if max_batch < 1:
            raise RlhfspecError(f"max_batch is {max_batch}; it must be >= 1.")
        self.cost, self.max_batch, self.targets, self.acceptance = cost, max_batch, targets, acceptance
        self.drafters, self.strategy = list(drafters or []), strategy
        self.live: list[Sequence] = []
        self.stats = InstanceStats()
        self.clock = 0.0
        self.decide_wall_s = 0.0  # the real selector's own CPU time here (not simulated time)
        self.busy: list[tuple[float, float]] = []  # (start, seconds) of every step, prefill and migration

    def _work(self, seconds: float) -> None:
        self.busy.append((self.clock, seconds))
        self.clock += seconds

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.live)

    def workload(self) -> Workload:
        return Workload.of(self.live, self.drafters)

    def add(self, seqs: list[Sequence]) -> list[Sequence]:
        """Prefill new samples (one packed forward; a prompt several of them share, once) and emit their first token."""
        if len(seqs) > self.free_slots:
            raise RlhfspecError(f"{len(seqs)} samples do not fit: this instance has {self.free_slots} free slots of max_batch {self.max_batch}.")
        if not seqs:
            return []
        _, prefilled = prefill_leaders(seqs)
        tokens = sum(len(s.prompt) for s in prefilled)
        seconds = self.cost.prefill(tokens, len(prefilled))
        self._work(seconds)
        self.stats.prefill_tokens += tokens
        self.stats.shared_prefill_tokens += sum(len(s.prompt) for s in seqs) - tokens
        self.stats.prefill_s += seconds
        self.live.extend(seqs)
        return self._emit(seqs, [1] * len(seqs))

    def step(self) -> list[Sequence]:
        """One decode step of every live sample, speculative if the strategy picks a drafter."""
        seqs = list(self.live)
        b = len(seqs)
        t = time.perf_counter()
        decision = self.strategy.decide(self.workload()) if self.strategy is not None else None
        self.decide_wall_s += time.perf_counter() - t
        context = sum(s.length for s in seqs) / b
        ids = [s.sample_id for s in seqs]
        if decision is not None and decision.drafter is not None and any(decision.n):
            if decision.drafter not in self.drafters:
                raise RlhfspecError(f"drafter {decision.drafter!r} is not attached; this instance has {sorted(self.drafters) or 'none'}.")
            n = clipped_draft_lengths(decision.n, [s.remaining for s in seqs])
            accepted = [self.acceptance.accepted(decision.drafter, s.sample_id, len(s.tokens), k) for s, k in zip(seqs, n)]
            active = sum(1 for k in n if k)
            draft_s = self.cost.draft(decision.drafter, active, max(n), context)
            verify_s = self.cost.verify(b, sum(k + 1 for k in n) / b, context)
            self.stats.proposed += sum(n)
            self.stats.accepted += sum(accepted)
            record = StepRecord(b, decision.drafter, n, list(n), accepted, sum(a + 1 for a in accepted), draft_s, verify_s,
                                context, ids, self.clock)
            emitted = [a + 1 for a in accepted]
        else:
            zeros = [0] * b
            record = StepRecord(b, None, zeros, zeros, zeros, b, 0.0, self.cost.verify(b, 1.0, context), context, ids, self.clock)
            emitted = [1] * b
        self._work(record.seconds)
        self.stats.record(record)
        if self.strategy is not None:
            self.strategy.observe(record)
        return self._emit(seqs, emitted)

    def _emit(self, seqs: list[Sequence], counts: list[int]) -> list[Sequence]:
        finished = []
        for s, k in zip(seqs, counts):
            target = min(self.targets[s.sample_id], s.params.max_new_tokens)
            take = min(k, target - len(s.tokens))
            s.tokens.extend([0] * take)
            s.logprobs.extend([0.0] * take)
            self.stats.emitted += take
            if len(s.tokens) >= target:
                s.finish_reason = "length" if target >= s.params.max_new_tokens else "stop"
                finished.append(s)
        self.release(finished)
        return finished

    def release(self, seqs: list[Sequence]) -> None:
        gone = {s.sample_id for s in seqs}
        for s in seqs:
            if self.strategy is not None:
                self.strategy.forget(s.sample_id)
        self.live = [s for s in self.live if s.sample_id not in gone]

    def run(self, steps: int) -> InstanceReport:
        start, finished, done = self.clock, [], 0
        while done < steps and self.live:
            finished.extend(self.step())
            done += 1
        return self.report(finished, self.clock - start, done)

    def report(self, finished: list[Sequence] | None = None, busy_s: float = 0.0, steps: int = 0) -> InstanceReport:
        st = self.stats
        per_token = st.prefill_s / st.prefill_tokens if st.prefill_tokens else None
        return InstanceReport(finished or [], list(self.live), self.free_slots, busy_s, steps, st.step_seconds,
                              st.tokens_per_step or 1.0, per_token, self.cost.kv_bytes_per_token)

    def export(self, sample_ids: list[int], with_kv: bool) -> list[Migrant]:
        out = []
        for sid in sample_ids:
            seq = next((s for s in self.live if s.sample_id == sid), None)
            if seq is None:
                raise RlhfspecError(f"sample {sid} is not live on this instance.")
            # A simulated migrant carries no tensors: an empty tuple stands for shipped KV rows.
            out.append(Migrant(seq, () if with_kv else None, strategy=self.strategy.export(sid) if self.strategy else {}))
            self.release([seq])
        return out

    def adopt(self, migrants: list[Migrant], link: tuple[float, float]) -> None:
        """Take migrants over: pay the transfer of their KV rows over the link, or recompute them."""
        if len(migrants) > self.free_slots:
            raise RlhfspecError(f"{len(migrants)} migrating samples do not fit: this instance has {self.free_slots} free slots.")
        bandwidth, latency = link
        recompute = []
        for m in migrants:
            self.live.append(m.seq)
            if m.kv is not None:
                self._work(latency + (m.seq.length - 1) * self.cost.kv_bytes_per_token / bandwidth)
            else:
                recompute.append(m.seq)
            if self.strategy is not None and m.strategy:
                self.strategy.adopt(m.seq.sample_id, m.strategy)
        if recompute:
            tokens = sum(s.length - 1 for s in recompute)
            seconds = self.cost.prefill(tokens, len(recompute))
            self._work(seconds)
            self.stats.prefill_tokens += tokens
            self.stats.prefill_s += seconds


class SimBackend:
    """K simulated instances on their own clocks; `now` is the coordinator's simulated time."""

    def __init__(self, instances: list[SimInstance], link: tuple[float, float] = (50e9, 1e-4)):
        self.instances, self.size, self.link_speed = instances, len(instances), link
        self.now = 0.0
        self.inflight: dict[int, tuple[float, InstanceReport]] = {}

    def clock(self) -> float:
        return self.now

    def _start(self, i: int) -> SimInstance:
        inst = self.instances[i]
        inst.clock = max(inst.clock, self.now)  # an idle instance waits for the coordinator
        return inst

    def validate(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            if not s.prompt:
                raise RlhfspecError(f"prompt {s.sample_id} is empty; every prompt needs at least one token.")

    def report(self, i: int) -> InstanceReport:
        return self.instances[i].report()

    def add(self, i: int, seqs: list[Sequence]) -> list[Sequence]:
        return self._start(i).add(seqs)

    def run_round(self, steps: int) -> Iterator[tuple[int, InstanceReport]]:
        """Start `steps` steps on every idle instance with live samples; yield the first to finish."""
        for i, inst in enumerate(self.instances):
            if inst.live and i not in self.inflight:
                report = self._start(i).run(steps)
                self.inflight[i] = (inst.clock, report)
        if not self.inflight:
            return
        i = min(self.inflight, key=lambda k: (self.inflight[k][0], k))
        t, report = self.inflight.pop(i)
        self.now = max(self.now, t)
        yield i, report

    def busy(self, i: int) -> bool:
        return i in self.inflight

    def export(self, i: int, sample_ids: list[int], with_kv: bool) -> list[Migrant]:
        return self.instances[i].export(sample_ids, with_kv)

    def adopt(self, i: int, migrants: list[Migrant]) -> None:
        self._start(i).adopt(migrants, self.link_speed)

    def link(self) -> tuple[float, float]:
        return self.link_speed

    def restart(self, i: int) -> None:
        raise RlhfspecError(f"simulated instance {i} cannot fail; nothing should restart it.")

    def stats(self) -> list[InstanceStats]:
        return [inst.stats for inst in self.instances]

    def shutdown(self) -> None:
        """Nothing to stop."""
