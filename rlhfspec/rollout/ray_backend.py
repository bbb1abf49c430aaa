"""The Ray backend: one actor per generation instance, stepped concurrently; dead actors are replaced."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterator

import torch

from rlhfspec.allocator import release_memory
from rlhfspec.engine.instance import GenerationInstance
from rlhfspec.engine.report import InstanceReport, InstanceStats, Migrant
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


def free_resource(need: float, wait: float = 5.0, kind: str = "CPU") -> float:
    """The Ray cluster's unreserved CPUs (or resources of another `kind`: "GPU"), once at least
    `need` are (actors just killed give theirs back a moment later), or after `wait` seconds."""
    ray = _ray()
    deadline = time.perf_counter() + wait
    while True:
        free = ray.available_resources().get(kind, 0)
        if free >= need or time.perf_counter() > deadline:
            return free
        time.sleep(0.2)


class _Host:
    """A generation instance inside its actor process. The model (loaded there from the spec), its
    drafters and strategy stay for the actor's life; each call's instance is built over them, so
    what the drafters and the strategy learn carries from one call to the next (an RL run's
    iterations), and new weights are loaded into them in place."""

    def __init__(self, spec: EngineSpec):
        self.model, self.tokenizer, self.drafters, self.strategy = spec.load()
        self.instance: GenerationInstance | None = None
        if spec.max_len is not None:
            self.begin(spec)

    def begin(self, spec: EngineSpec) -> None:
        """A fresh instance fitted to a call (its KV cache sized by spec.max_len and max_batch)."""
        self.instance = spec.build(self.model, self.tokenizer, drafters=self.drafters, strategy=self.strategy)

    def check(self, seqs: list[Sequence]) -> None:
        self.instance.check(seqs)

    def report(self) -> InstanceReport:
        return untraced(self.instance.report())

    def add(self, seqs: list[Sequence]) -> list[Sequence]:
        return self.instance.add(seqs)

    def run(self, steps: int) -> InstanceReport:
        return untraced(self.instance.run(steps))

    def export(self, sample_ids: list[int], with_kv: bool) -> list[Migrant]:
        """The samples leaving, their tensors on the CPU (Ray would otherwise hand a GPU actor's
        tensors to the next process on the same device number)."""
        return [replace(m, kv=on_cpu(m.kv), drafters=on_cpu(m.drafters)) for m in self.instance.export(sample_ids, with_kv)]

    def adopt(self, migrants: list[Migrant]) -> None:
        self.instance.adopt(migrants)

    def stats(self) -> InstanceStats:
        return self.instance.stats

    def load_weights(self, weights: tuple, drafters: dict[str, dict]) -> None:
        """The policy's new weights (`pack_weights`' buffer, read in place from Ray's store) and
        drafters' new states, copied into the model and drafters (the engine repacks what changed)."""
        with torch.no_grad():
            self.model.load_state_dict(unpack_weights(*weights), strict=True)
        by_name = {d.name: d for d in self.drafters}
        for name, state in drafters.items():
            by_name[name].load_state_dict(state)
        release_memory()

    def state_dict(self) -> dict:
        """What the drafters and the strategy learned (n-gram histories, acceptance estimates, cost corrections)."""
        return on_cpu({"drafters": [d.state_dict() for d in self.drafters], "strategy": self.strategy.state_dict() if self.strategy else {}})

    def load_state_dict(self, state: dict) -> None:
        for d, st in zip(self.drafters, state["drafters"]):
            d.load_state_dict(st)
        if self.strategy is not None:
            self.strategy.load_state_dict(state["strategy"])

    def receive(self, payload) -> int:
        """For measuring the link: take a payload, return its size."""
        return len(payload)


def untraced(report: InstanceReport) -> InstanceReport:
    """The report as an actor ships it: its live samples without their Traces, which would
    otherwise cross to the driver at every report (a response's kept targets and features, about
    2.7 KB a token for the default model); finished samples keep theirs. A sample resubmitted from
    such a copy after its actor died goes on without a Trace (a drafter refresh skips it)."""
    return replace(report, live=[replace(s, trace=None) if s.trace is not None else s for s in report.live])


class RayBackend:
    """K actors on a local Ray cluster started here (or the one at `address`); one CPU per
    `spec.threads` for each, one GPU each when `gpus_per_actor` is set."""

    def __init__(self, spec: EngineSpec, size: int, address: str | None = None, gpus_per_actor: float = 0.0):
        if spec.model is None:
            raise RlhfspecError("the ray backend's actors load their own model; the engine spec must name it (model='default', a directory or a .gguf file).")
        ray = _ray()
        self.ray, self.spec, self.size = ray, spec, size
        need = size * (spec.threads or 1)
        self.owns_cluster = connect(address, num_cpus=need)
        free = free_resource(need)
        gpus = free_resource(size * gpus_per_actor, kind="GPU") if gpus_per_actor else 0
        problem = None  # the actors would wait for CPUs or GPUs forever
        if free < need:
            problem = f"{size} generation actors of {spec.threads or 1} threads need {need} CPUs, but the Ray cluster has {free:g} free."
        elif gpus < size * gpus_per_actor:
            problem = (f"{size} generation actors of {gpus_per_actor:g} GPU each need {size * gpus_per_actor:g} GPUs, but the Ray cluster "
                       f"has {gpus:g} free (generation.gpus_per_instance below 1 lets actors share a GPU).")
        if problem:
            if self.owns_cluster:
                ray.shutdown()
            raise RlhfspecError(problem)
        self.remote = ray.remote(num_cpus=spec.threads or 1, num_gpus=gpus_per_actor)(_Host)
        self.actors = [self.remote.remote(spec) for _ in range(size)]
        self.inflight: dict[int, object] = {}
        self.live = [0] * size
        self.weights: tuple | None = None  # the last weights shipped (object refs), for actors that replace dead ones
        # An actor that died, or that Ray stopped for want of memory: its samples are resubmitted.
        self.lost = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError)

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

    def stats(self) -> list[InstanceStats]:
        """Each actor's counters and step records of the current call (an actor that replaced a
        dead one has only its own)."""
        return self._get([a.stats.remote() for a in self.actors])

    def begin(self, spec: EngineSpec) -> None:
        """Fit every actor's instance to a new call (the RL loop keeps the actors across iterations)."""
        self.spec = spec
        self._get([a.begin.remote(spec) for a in self.actors])

    def load_weights(self, weights: dict, drafters: dict[str, dict] | None = None) -> tuple[float, int]:
        """Ship the policy's weights (already in the engine's precision) and drafter states to every
        actor: one byte buffer in Ray's store, which the actors on a node read without copies, and
        each loads in place. An actor that dies meanwhile is replaced (with these weights). (seconds, bytes)."""
        start = time.perf_counter()
        packed = pack_weights(weights)
        self.weights = (self.ray.put(packed), self.ray.put(drafters or {}))
        refs = [a.load_weights.remote(*self.weights) for a in self.actors]
        for i, ref in enumerate(refs):
            try:
                self._get(ref)
            except self.lost:
                self.restart(i)
        size = packed[0].nbytes + sum(t.numel() * t.element_size() for st in (drafters or {}).values() for t in _tensors(st))
        return time.perf_counter() - start, size

    def state_dict(self) -> list[dict]:
        """Each actor's drafter and strategy state (see _Host.state_dict)."""
        return self._get([a.state_dict.remote() for a in self.actors])

    def load_state_dict(self, states: list[dict]) -> None:
        self._get([a.load_state_dict.remote(st) for a, st in zip(self.actors, states)])

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
            except self.lost:
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
        if self.weights is not None:  # the run's current weights, not the checkpoint the spec names
            self._get(self.actors[i].load_weights.remote(*self.weights))
        self.live[i] = 0

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []
        if self.owns_cluster:
            self.ray.shutdown()


def on_cpu(obj):
    """A (nested dict, list or tuple) state with its tensors on the CPU: what crosses a process
    boundary through Ray, which would rebuild a GPU tensor on the same device number elsewhere."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def _tensors(state) -> Iterator[torch.Tensor]:
    """The tensors anywhere in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for v in state.values():
            yield from _tensors(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _tensors(v)


def pack_weights(state: dict[str, torch.Tensor], align: int = 64) -> tuple:
    """(one contiguous uint8 numpy buffer of every tensor, manifest [(name, dtype, shape, offset)]):
    Ray keeps a numpy buffer in shared memory that every actor on a node reads in place, where a
    dict of tensors would be pickled and copied into each."""
    sizes = {k: t.numel() * t.element_size() for k, t in state.items()}
    offsets, end = {}, 0
    for k, n in sizes.items():
        offsets[k] = end
        end += -(-n // align) * align  # aligned, so any dtype's view of the bytes is legal
    buf = torch.empty(end, dtype=torch.uint8)
    for k, t in state.items():
        buf[offsets[k] : offsets[k] + sizes[k]].view(t.dtype).copy_(t.detach().reshape(-1))
    manifest = [(k, str(t.dtype).removeprefix("torch."), tuple(t.shape), offsets[k]) for k, t in state.items()]
    return buf.numpy(), manifest


def unpack_weights(buf, manifest) -> dict[str, torch.Tensor]:
    """Views of `pack_weights`' buffer as the tensors it holds (no copy; read-only when Ray shares it)."""
    import warnings

    with warnings.catch_warnings():  # a read-only buffer: these views are only ever read
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(buf)
    out = {}
    for name, dtype, shape, offset in manifest:
        dt = getattr(torch, dtype)
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
        out[name] = flat[offset : offset + n].view(dt).view(shape)
    return out
