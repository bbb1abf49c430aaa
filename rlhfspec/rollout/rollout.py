"""The generation stage of an RL iteration: the policy's instances, kept from one iteration to the next."""

from __future__ import annotations

from rlhfspec.engine.drafters import Drafter
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.spec import EngineSpec
from rlhfspec.errors import RlhfspecError
from rlhfspec.rollout.generate import Generation, Live, Placement, live_parts, run_generation


class Rollout:
    """Generates completions for many prompts with the in-process policy on the instances `spec`
    and `placement` describe, keeping each instance's drafters and strategy (and what they
    learned: n-gram histories, acceptance estimates, cost corrections) across iterations.
    Instance 0 drafts with `drafters` (the RL loop refreshes them); the others with replicas
    over the same draft weights. Every instance's drafters and strategy are checkpointed."""

    def __init__(self, policy, tokenizer, spec: EngineSpec, placement: Placement | None = None):
        self.policy, self.tokenizer, self.spec = policy, tokenizer, spec
        self.placement = placement or Placement()
        self.drafters: list[Drafter] = [d.build(policy, tokenizer) for d in spec.drafters]
        self.live: list[Live] = live_parts(self.drafters, spec.strategy, policy, self.placement.instances)

    def run(self, prompts: list[list[int]], params: SamplingParams, seed: int, sample_ids: list[int], progress: bool = False) -> Generation:
        return run_generation(self.spec, prompts, params, seed, placement=self.placement, model=self.policy, tokenizer=self.tokenizer,
                              sample_ids=sample_ids, live=self.live, progress=progress)

    def state_dict(self) -> dict:
        """What the drafters and strategies learned, for checkpoints (plain data and tensors)."""
        return {"drafters": [[d.state_dict() for d in ds] for ds, _ in self.live],
                "strategies": [s.state_dict() if s is not None else {} for _, s in self.live]}

    def load_state_dict(self, state: dict) -> None:
        have = [len(ds) for ds, _ in self.live]
        saved = [len(ds) for ds in state["drafters"]]
        if have != saved:
            raise RlhfspecError(f"the checkpoint holds drafter state for {len(saved)} instances x {saved[:1] or [0]} drafters, but this run "
                                f"has {len(have)} x {have[:1] or [0]}; resume with the generation settings it was written with.")
        for (drafters, strategy), ds, ss in zip(self.live, state["drafters"], state["strategies"]):
            for d, st in zip(drafters, ds):
                d.load_state_dict(st)
            if strategy is not None:
                strategy.load_state_dict(ss)
