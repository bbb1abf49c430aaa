"""The in-process backend: K instances in one process, stepped in turn (deterministic)."""

from __future__ import annotations

from typing import Callable, Iterator

from rlhfspec.engine.instance import Migrant
from rlhfspec.engine.sequence import Sequence
from rlhfspec.rollout.local import LocalInstance, Report


class InprocBackend:
    def __init__(self, factory: Callable[[int], LocalInstance], size: int):
        self.factory, self.size = factory, size
        self.instances = [factory(i) for i in range(size)]

    def report(self, i: int) -> Report:
        return self.instances[i].report()

    def add(self, i: int, seqs: list[Sequence]) -> list[Sequence]:
        return self.instances[i].add(seqs)

    def run_round(self, steps: int) -> Iterator[tuple[int, Report | None]]:
        for i, inst in enumerate(self.instances):
            if inst.instance.live:
                yield i, inst.run(steps)

    def idle(self, i: int) -> bool:
        return True

    def export(self, i: int, sample_ids: list[int], with_kv: bool) -> list[Migrant]:
        return self.instances[i].export(sample_ids, with_kv)

    def adopt(self, i: int, migrants: list[Migrant]) -> None:
        self.instances[i].adopt(migrants)

    def link(self, size: int = 16 << 20) -> tuple[float, float]:
        """Measured (bytes per second, seconds per call): a migration here is a memory copy."""
        import time

        import torch

        x = torch.ones(size, dtype=torch.uint8)
        t = time.perf_counter()
        x.clone()
        return size / max(time.perf_counter() - t, 1e-6), 1e-5

    def restart(self, i: int) -> None:
        self.instances[i] = self.factory(i)

    def shutdown(self) -> None:
        pass
