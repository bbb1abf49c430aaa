"""The generation stage of an RL iteration: the policy's instances, kept from one iteration to the next."""

from __future__ import annotations

from dataclasses import replace

from rlhfspec.engine.drafters import DraftModelDrafter, Drafter, EagleDrafter
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.spec import EngineSpec
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.rounding import engine_copy
from rlhfspec.rollout.ray_backend import on_cpu
from rlhfspec.rollout.generate import Generation, Live, Placement, live_parts, run_generation


class Rollout:
    """Generates completions for many prompts with the policy on the instances `spec` and
    `placement` describe, keeping each instance's drafters and strategy (and what they learned:
    n-gram histories, acceptance estimates, cost corrections) across iterations. Every
    instance's drafters and strategy are checkpointed.

    In-process (placement.backend "inproc"), the instances run `policy` itself; instance 0
    drafts with `drafters` (the RL loop refreshes them), the others with replicas over the same
    draft weights. On Ray, each of the K actors loads the model `model` names in `dtype` and
    builds its own drafters; `sync` ships the policy's weights and the refreshed drafters' to
    every actor after each update (`drafters` here are the copies the RL loop refreshes); an actor
    runs on `device` ("cuda": the GPU Ray gave it, placement.gpus_per_instance of one)."""

    def __init__(self, policy, tokenizer, spec: EngineSpec, placement: Placement | None = None, *,
                 model: str | None = None, dtype: str | None = None, threads: int | None = None, device: str = "cpu"):
        self.policy, self.tokenizer, self.spec = policy, tokenizer, spec
        self.placement = placement or Placement()
        self.drafters: list[Drafter] = [d.build(policy, tokenizer) for d in spec.drafters]
        self.live: list[Live] | None = None
        self.backend = None
        if self.placement.backend == "ray":
            from rlhfspec.rollout.ray_backend import RayBackend

            self.spec = replace(spec, model=model, dtype=dtype, threads=threads, device=device)
            p = self.placement
            self.backend = RayBackend(self.spec, p.instances, address=p.ray_address, gpus_per_actor=p.gpus_per_instance)
        else:
            self.live = live_parts(self.drafters, spec.strategy, policy, self.placement.instances)

    def run(self, prompts: list[list[int]], params: SamplingParams, seed: int, sample_ids: list[int], progress: bool = False) -> Generation:
        return run_generation(self.spec, prompts, params, seed, placement=self.placement, model=self.policy, tokenizer=self.tokenizer,
                              sample_ids=sample_ids, live=self.live, backend=self.backend, progress=progress)

    def sync(self, dtype, rounding: str = "nearest", key: tuple[int, ...] = ()) -> dict:
        """Ship the policy's current weights (cast to the actors' `dtype` with `rounding`, keyed
        by `key` as `engine_copy` says) and the refreshed drafters' to every Ray actor; their
        measured time and size. In-process instances run the policy itself."""
        if self.backend is None:
            return {}
        weights = {k: engine_copy(k, v, dtype, rounding, key) for k, v in self.policy.state_dict().items()}
        drafters = {d.name: on_cpu(d.state_dict()) for d in self.drafters if isinstance(d, (DraftModelDrafter, EagleDrafter))}
        seconds, size = self.backend.load_weights(weights, drafters)
        return {"weight_sync_s": seconds, "weight_sync_mb": size / 2**20}

    def state_dict(self) -> dict:
        """What the drafters and strategies learned, for checkpoints (plain data and tensors)."""
        if self.backend is not None:
            states = self.backend.state_dict()
            return {"drafters": [s["drafters"] for s in states], "strategies": [s["strategy"] for s in states]}
        return {"drafters": [[d.state_dict() for d in ds] for ds, _ in self.live],
                "strategies": [s.state_dict() if s is not None else {} for _, s in self.live]}

    def load_state_dict(self, state: dict) -> None:
        have = [len(self.drafters)] * self.placement.instances
        saved = [len(ds) for ds in state["drafters"]]
        if have != saved:
            raise RlhfspecError(f"the checkpoint holds drafter state for {len(saved)} instances x {saved[:1] or [0]} drafters, but this run "
                                f"has {len(have)} x {have[:1] or [0]}; resume with the generation settings it was written with.")
        if self.backend is not None:
            self.backend.load_state_dict([{"drafters": ds, "strategy": ss} for ds, ss in zip(state["drafters"], state["strategies"])])
            for d, st in zip(self.drafters, state["drafters"][0]):  # the copies `sync` ships from
                d.load_state_dict(st)
            return
        for (drafters, strategy), ds, ss in zip(self.live, state["drafters"], state["strategies"]):
            for d, st in zip(drafters, ds):
                d.load_state_dict(st)
            if strategy is not None:
                strategy.load_state_dict(ss)

    def shutdown(self) -> None:
        """Stop the Ray actors (nothing to stop in-process)."""
        if self.backend is not None:
            self.backend.shutdown()
            self.backend = None
