"""An in-process generation instance as the coordinator drives it (the Ray actor wraps the same class)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlhfspec.engine.drafters import Drafter
from rlhfspec.engine.instance import GenerationInstance, Migrant
from rlhfspec.engine.sequence import Sequence
from rlhfspec.strategy.base import Strategy


@dataclass(slots=True)
class Report:
    """What an instance tells the coordinator after running some steps."""

    instance: int
    finished: list[Sequence]
    live: list[Sequence]  # snapshots of the samples still running (enough to recompute them elsewhere)
    free_slots: int
    busy_s: float  # seconds spent stepping in this call
    steps: int
    step_seconds: dict[int, float]  # measured seconds per step by live batch size (running means)
    tokens_per_step: float
    prefill_seconds_per_token: float | None  # measured over this instance's prefills so far
    kv_bytes_per_token: float  # policy and draft-model KV rows one token occupies


class LocalInstance:
    """A GenerationInstance plus the bookkeeping the coordinator needs (measured step times)."""

    def __init__(self, index: int, model, max_batch: int, max_len: int, tokenizer=None,
                 drafters: list[Drafter] | None = None, strategy: Strategy | None = None, threads: int | None = None,
                 batch_invariant: bool = True):
        if threads:
            torch.set_num_threads(threads)
        self.index = index
        self.instance = GenerationInstance(model, max_batch, max_len, tokenizer=tokenizer, drafters=drafters, strategy=strategy,
                                           batch_invariant=batch_invariant)
        self.step_times: dict[int, tuple[float, int]] = {}
        self.prefill = [0.0, 0]  # seconds, tokens
        caches = [self.instance.cache] + [getattr(d, "cache", None) for d in self.instance.drafters.values()]
        self.kv_bytes_per_token = float(sum(c.bytes_per_token for c in caches if c is not None))

    def free_slots(self) -> int:
        return self.instance.free_slots

    def add(self, seqs: list[Sequence]) -> list[Sequence]:
        return self._timed_prefill(lambda: self.instance.add(seqs), sum(len(s.prompt) for s in seqs))

    def _timed_prefill(self, fn, tokens: int):
        start = time.perf_counter()
        out = fn()
        self.prefill[0] += time.perf_counter() - start
        self.prefill[1] += tokens
        return out

    def run(self, steps: int) -> Report:
        """Up to `steps` decode steps (fewer if the instance empties)."""
        finished: list[Sequence] = []
        start, done = time.perf_counter(), 0
        while done < steps and self.instance.live:
            batch = len(self.instance.live)
            t = time.perf_counter()
            finished.extend(self.instance.step())
            total, count = self.step_times.get(batch, (0.0, 0))
            self.step_times[batch] = (total + time.perf_counter() - t, count + 1)
            done += 1
        return self.report(finished, time.perf_counter() - start, done)

    def report(self, finished: list[Sequence] | None = None, busy: float = 0.0, steps: int = 0) -> Report:
        st = self.instance.stats
        per_token = self.prefill[0] / self.prefill[1] if self.prefill[1] else None
        return Report(self.index, finished or [], [_snapshot(s) for s in self.instance.live], self.instance.free_slots, busy, steps,
                      {b: t / c for b, (t, c) in self.step_times.items()}, st.tokens_per_step or 1.0, per_token,
                      self.kv_bytes_per_token)

    def export(self, sample_ids: list[int], with_kv: bool) -> list[Migrant]:
        return [self.instance.export(i, with_kv) for i in sample_ids]

    def adopt(self, migrants: list[Migrant]) -> None:
        recomputed = sum(m.seq.length - 1 for m in migrants if m.kv is None)
        if recomputed:
            self._timed_prefill(lambda: self.instance.adopt(migrants), recomputed)
        else:
            self.instance.adopt(migrants)


def _snapshot(s: Sequence) -> Sequence:
    return Sequence(s.sample_id, s.prompt, s.params, s.seed, s.group, list(s.tokens), list(s.logprobs), s.finish_reason, -1)
