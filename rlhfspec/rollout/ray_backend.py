"""The Ray backend: one actor per generation instance, stepped concurrently; dead actors are replaced."""

from __future__ import annotations

from typing import Iterator

from rlhfspec.engine.instance import Migrant
from rlhfspec.engine.sequence import Sequence
from rlhfspec.errors import RlhfspecError
from rlhfspec.rollout.local import Report
from rlhfspec.rollout.spec import InstanceSpec


def _ray():
    try:
        import ray
    except ImportError:
        raise RlhfspecError("the ray backend needs Ray: pip install ray") from None
    return ray


class _Host:
    """Runs inside the actor process: builds the instance there and forwards calls to it."""

    def __init__(self, index: int, spec: InstanceSpec):
        self.local = spec.build(index)

    def report(self) -> Report:
        return self.local.report()

    def add(self, seqs: list[Sequence]) -> list[Sequence]:
        return self.local.add(seqs)

    def run(self, steps: int) -> Report:
        return self.local.run(steps)

    def export(self, ids: list[int], with_kv: bool) -> list[Migrant]:
        return self.local.export(ids, with_kv)

    def adopt(self, migrants: list[Migrant]) -> None:
        self.local.adopt(migrants)

    def receive(self, payload) -> int:
        """For measuring the link: take a payload, return its size."""
        return len(payload)


class RayBackend:
    """K actors on a local Ray cluster started here (or the one at `address`); one CPU per
    `spec.threads` for each, one GPU each when `gpus_per_actor` is set."""

    def __init__(self, spec: InstanceSpec, size: int, address: str | None = None, gpus_per_actor: float = 0.0):
        ray = _ray()
        self.ray, self.spec, self.size = ray, spec, size
        self.owns_cluster = not ray.is_initialized()
        if self.owns_cluster:
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=max(size * (spec.threads or 1), 1), **kwargs)
        self.remote = ray.remote(num_cpus=spec.threads or 1, num_gpus=gpus_per_actor)(_Host)
        self.actors = [self.remote.remote(i, spec) for i in range(size)]
        self.inflight: dict[int, object] = {}
        self.live = [0] * size

    def link(self, size: int = 16 << 20, repeats: int = 3) -> tuple[float, float]:
        """Measured (bytes per second, seconds per call) of shipping data to an actor."""
        import time

        import numpy as np

        payload = np.ones(size, dtype=np.uint8)

        def best(x) -> float:
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                self._get(self.actors[0].receive.remote(x))
                times.append(time.perf_counter() - t)
            return min(times)

        latency = best(b"x")
        return size / max(best(payload) - latency, 1e-6), latency

    def _get(self, ref):
        return self.ray.get(ref)

    def report(self, i: int) -> Report:
        r = self._get(self.actors[i].report.remote())
        self.live[i] = len(r.live)
        return r

    def add(self, i: int, seqs: list[Sequence]) -> list[Sequence]:
        out = self._get(self.actors[i].add.remote(seqs))
        self.live[i] += len(seqs) - len(out)
        return out

    def run_round(self, steps: int) -> Iterator[tuple[int, Report | None]]:
        """Start `steps` steps on every idle actor with live samples; yield the first to return."""
        for i, n in enumerate(self.live):
            if n and i not in self.inflight:
                self.inflight[i] = self.actors[i].run.remote(steps)
        if not self.inflight:
            return
        refs = {ref: i for i, ref in self.inflight.items()}
        ready, _ = self.ray.wait(list(refs), num_returns=1)
        for ref in ready:
            i = refs[ref]
            del self.inflight[i]
            try:
                report = self._get(ref)
            except self.ray.exceptions.RayActorError:
                yield i, None
                continue
            self.live[i] = len(report.live)
            yield i, report

    def idle(self, i: int) -> bool:
        return i not in self.inflight

    def export(self, i: int, sample_ids: list[int], with_kv: bool) -> list[Migrant]:
        out = self._get(self.actors[i].export.remote(sample_ids, with_kv))
        self.live[i] -= len(out)
        return out

    def adopt(self, i: int, migrants: list[Migrant]) -> None:
        self._get(self.actors[i].adopt.remote(migrants))
        self.live[i] += len(migrants)

    def restart(self, i: int) -> None:
        """Replace a dead actor with a fresh one (its samples are resubmitted by the coordinator)."""
        self.ray.kill(self.actors[i], no_restart=True)
        self.inflight.pop(i, None)
        self.actors[i] = self.remote.remote(i, self.spec)
        self.live[i] = 0

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []
        if self.owns_cluster:
            self.ray.shutdown()
