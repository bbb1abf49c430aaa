"""The Ray backend: one actor per generation instance, stepped concurrently; dead actors are replaced."""

from __future__ import annotations

from typing import Iterator

from rlhfspec.engine.instance import GenerationInstance, InstanceReport, Migrant
from rlhfspec.engine.sequence import Sequence
from rlhfspec.engine.spec import EngineSpec
from rlhfspec.errors import RlhfspecError


def _ray():
    try:
        import ray
    except ImportError:
        raise RlhfspecError("the ray backend needs Ray: pip install ray") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address`, or start a local one with `num_cpus` CPUs, unless this
    process is connected already; True when this call started the connection (its caller shuts it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
    except ConnectionError as e:
        raise RlhfspecError(f"could not reach the Ray cluster at {address}: {e}") from None
    return True


class _Host(GenerationInstance):
    """The instance inside its actor process, built there from the spec (it loads its own model)."""

    def __init__(self, spec: EngineSpec):
        super().__init__(**spec.parts())

    def receive(self, payload) -> int:
        """For measuring the link: take a payload, return its size."""
        return len(payload)


class RayBackend:
    """K actors on a local Ray cluster started here (or the one at `address`); one CPU per
    `spec.threads` for each, one GPU each when `gpus_per_actor` is set."""

    def __init__(self, spec: EngineSpec, size: int, address: str | None = None, gpus_per_actor: float = 0.0):
        if spec.model is None:
            raise RlhfspecError("the ray backend's actors load their own model; the engine spec must name it (model='default', a directory or a .gguf file).")
        ray = _ray()
        self.ray, self.spec, self.size = ray, spec, size
        self.owns_cluster = connect(address, num_cpus=max(size * (spec.threads or 1), 1))
        self.remote = ray.remote(num_cpus=spec.threads or 1, num_gpus=gpus_per_actor)(_Host)
        self.actors = [self.remote.remote(spec) for _ in range(size)]
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

    def validate(self, seqs: list[Sequence]) -> None:
        self._get(self.actors[0].check.remote(seqs))

    def stats(self) -> list:
        """The actors keep their step records to themselves."""
        return []

    def report(self, i: int) -> InstanceReport:
        r = self._get(self.actors[i].report.remote())
        self.live[i] = len(r.live)
        return r

    def add(self, i: int, seqs: list[Sequence]) -> list[Sequence]:
        out = self._get(self.actors[i].add.remote(seqs))
        self.live[i] += len(seqs) - len(out)
        return out

    def run_round(self, steps: int) -> Iterator[tuple[int, InstanceReport | None]]:
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

    def busy(self, i: int) -> bool:
        return i in self.inflight

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
        self.actors[i] = self.remote.remote(self.spec)
        self.live[i] = 0

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []
        if self.owns_cluster:
            self.ray.shutdown()
