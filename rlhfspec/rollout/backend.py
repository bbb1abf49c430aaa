"""The backend contract the coordinator drives, and the in-process backend."""

from __future__ import annotations

import time
from typing import Callable, Iterator, Protocol

import torch

from rlhfspec.engine.instance import GenerationInstance
from rlhfspec.engine.report import InstanceReport, InstanceStats, Migrant
from rlhfspec.engine.sequence import Sequence
from rlhfspec.engine.spec import EngineSpec


class Backend(Protocol):
    """K generation instances, addressed 0..size-1, wherever they run."""

    size: int

    def validate(self, seqs: list[Sequence]) -> None:
        """One sentence for the first sample no instance could run, before any work."""

    def begin(self, spec: EngineSpec) -> None:
        """Fit the instances to another call's spec (a backend reused across calls)."""

    def report(self, i: int) -> InstanceReport:
        """Instance i's state now (no steps run)."""

    def add(self, i: int, seqs: list[Sequence]) -> list[Sequence]:
        """Prefill new samples on instance i; returns those already finished."""

    def run_round(self, steps: int) -> Iterator[tuple[int, InstanceReport | None]]:
        """Run up to `steps` steps on instances with live samples; yield (i, report) as they come
        back, report None for an instance that died."""

    def busy(self, i: int) -> bool:
        """Whether a call to instance i is in flight (its free slots are not known yet)."""

    def export(self, i: int, sample_ids: list[int], with_kv: bool) -> list[Migrant]: ...

    def adopt(self, i: int, migrants: list[Migrant]) -> None: ...

    def link(self) -> tuple[float, float]:
        """Measured (bytes per second, seconds per call) of shipping a migrant between instances."""

    def restart(self, i: int) -> None:
        """Replace a dead instance with a fresh, empty one."""

    def stats(self) -> list[InstanceStats]:
        """Each instance's counters and step records, where the driver can read them ([] if not)."""

    def shutdown(self) -> None: ...


class InprocBackend:
    """K instances in this process, stepped in turn (deterministic); `make(i)` builds instance i,
    `build(i, spec)` (when given) instance i fitted to a call's spec."""

    def __init__(self, make: Callable[[int], GenerationInstance], size: int,
                 build: Callable[[int, EngineSpec], GenerationInstance] | None = None):
        self.make, self.size, self.build = make, size, build
        self.instances = [make(i) for i in range(size)]

    def begin(self, spec: EngineSpec) -> None:
        """A backend reused for another call: its instances rebuilt fitted to `spec` when it knows
        how (`build`), else kept as they were made."""
        if self.build is not None:
            self.make = lambda i: self.build(i, spec)
            self.instances = [self.make(i) for i in range(self.size)]

    def validate(self, seqs: list[Sequence]) -> None:
        self.instances[0].check(seqs)

    def report(self, i: int) -> InstanceReport:
        return self.instances[i].report()

    def add(self, i: int, seqs: list[Sequence]) -> list[Sequence]:
        return self.instances[i].add(seqs)

    def run_round(self, steps: int) -> Iterator[tuple[int, InstanceReport | None]]:
        for i, inst in enumerate(self.instances):
            if inst.live:
                yield i, inst.run(steps)

    def busy(self, i: int) -> bool:
        return False  # every call returns before the next is made

    def export(self, i: int, sample_ids: list[int], with_kv: bool) -> list[Migrant]:
        return self.instances[i].export(sample_ids, with_kv)

    def adopt(self, i: int, migrants: list[Migrant]) -> None:
        self.instances[i].adopt(migrants)

    def link(self, size: int = 16 << 20) -> tuple[float, float]:
        """A migration here is a memory copy: its measured speed, and a nominal 10 us per call."""
        x = torch.ones(size, dtype=torch.uint8)
        t = time.perf_counter()
        x.clone()
        return size / max(time.perf_counter() - t, 1e-6), 1e-5

    def restart(self, i: int) -> None:
        self.instances[i] = self.make(i)

    def stats(self) -> list[InstanceStats]:
        return [inst.stats for inst in self.instances]

    def shutdown(self) -> None:
        """Nothing to stop: the instances are this process's objects."""
