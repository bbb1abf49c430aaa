"""Generation over several instances: the backend, the coordinator and reallocation behind one call."""

from __future__ import annotations

from dataclasses import dataclass

from rlhfspec.engine.generate import checked_sample_ids
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.sequence import GenerationOutput, Sequence
from rlhfspec.errors import RlhfspecError
from rlhfspec.rollout.coordinator import Coordinator
from rlhfspec.rollout.policy import ReallocationPolicy
from rlhfspec.rollout.spec import InstanceSpec

BACKENDS = ("inproc", "ray")


@dataclass
class MultiConfig:
    instances: int = 2
    backend: str = "inproc"  # "inproc" (one process, deterministic) or "ray" (one actor per instance)
    realloc: bool = True
    ray_address: str | None = None  # join this Ray cluster instead of starting a local one
    gpus_per_instance: float = 0.0
    steps_per_call: int = 4  # decode steps an instance runs between reports
    migration: str = "auto"  # "auto" (cheaper of KV transfer and recompute), "kv" or "recompute"

    def __post_init__(self):
        if self.instances < 1:
            raise RlhfspecError(f"--instances must be at least 1, got {self.instances}.")
        if self.backend not in BACKENDS:
            raise RlhfspecError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}.")


def instance_batch(samples: int, instances: int, cap: int) -> int:
    """Live slots per instance: an even share of the samples, at most `cap`."""
    return min(cap, -(-samples // instances))


def make_backend(spec: InstanceSpec, cfg: MultiConfig, model=None, tokenizer=None):
    """In-process instances share one loaded model; Ray actors each load their own."""
    if cfg.backend == "ray":
        from rlhfspec.rollout.ray_backend import RayBackend

        return RayBackend(spec, cfg.instances, address=cfg.ray_address, gpus_per_actor=cfg.gpus_per_instance)
    from rlhfspec.rollout.inproc import InprocBackend

    return InprocBackend(lambda i: spec.build(i, model, tokenizer), cfg.instances)


def generate_multi(spec: InstanceSpec, prompts: list[list[int]], params: SamplingParams, seed: int, cfg: MultiConfig,
                   *, model=None, tokenizer=None, sample_ids: list[int] | None = None,
                   backend=None, progress: bool = False) -> tuple[list[GenerationOutput], Coordinator]:
    """Complete the prompts over cfg.instances instances; outputs in prompt order, the same tokens
    as one instance would give (keyed sampling), whatever the placement and migrations.
    Returns the coordinator too, for its timeline. A backend passed in is reused and not shut down."""
    ids = checked_sample_ids(sample_ids, len(prompts))
    longest = max((len(p) for p in prompts), default=0)
    if longest + params.max_new_tokens > spec.max_len:
        raise RlhfspecError(f"prompt length {longest} + max_new_tokens {params.max_new_tokens} exceeds the instances' "
                            f"max_len {spec.max_len}.")
    owned = backend is None
    backend = backend or make_backend(spec, cfg, model, tokenizer)
    try:
        policy = ReallocationPolicy() if cfg.realloc else None
        coord = Coordinator(backend, policy, steps_per_call=cfg.steps_per_call, mode=cfg.migration,
                            max_new_tokens=params.max_new_tokens, progress=progress)
        seqs = [Sequence(sid, list(p), params, seed) for sid, p in zip(ids, prompts)]
        done = coord.run(seqs)
    finally:
        if owned:
            backend.shutdown()
    return [GenerationOutput.of(s) for s in done], coord
