"""One interface for the generation stage; flags switch speculative decoding, the adaptive strategy
and (with several instances) sample reallocation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rlhfspec.engine.drafters import DraftModelDrafter, Drafter
from rlhfspec.engine.generate import adaptive_strategy, generate
from rlhfspec.engine.instance import InstanceStats
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.sequence import GenerationOutput
from rlhfspec.errors import RlhfspecError
from rlhfspec.strategy.base import StaticStrategy, Strategy


@dataclass
class RolloutResult:
    outputs: list[GenerationOutput]
    stats: list[InstanceStats]
    seconds: float
    tokens: int = field(init=False)

    def __post_init__(self):
        self.tokens = sum(len(o.token_ids) for o in self.outputs)

    @property
    def acceptance(self) -> float | None:
        proposed = sum(s.proposed for s in self.stats)
        return sum(s.accepted for s in self.stats) / proposed if proposed else None

    def acceptance_by_drafter(self) -> dict[str, float]:
        totals: dict[str, list[int]] = {}
        for s in self.stats:
            for r in s.records:
                if r.drafter is not None:
                    t = totals.setdefault(r.drafter, [0, 0])
                    t[0] += sum(r.accepted)
                    t[1] += sum(r.drafted)
        return {k: a / p for k, (a, p) in totals.items() if p}


class Rollout:
    """Generates completions for many prompts with the policy, keeping drafters and the strategy
    (and what they learned) from one iteration to the next."""

    def __init__(self, policy, tokenizer, *, batch_size: int = 64, spec: bool = True, strategy: str = "adaptive",
                 drafters: list[Drafter] | None = None, num_draft_tokens: int = 4):
        self.policy, self.tokenizer, self.batch_size = policy, tokenizer, batch_size
        self.drafters = list(drafters or []) if spec else []
        self.strategy: Strategy | None = None
        if self.drafters:
            if strategy == "adaptive":
                self.strategy = adaptive_strategy(policy, self.drafters)
            elif strategy == "static":
                self.strategy = StaticStrategy(self.drafters[0].name, num_draft_tokens)
            else:
                raise RlhfspecError(f"generation strategy {strategy!r} is not 'adaptive' or 'static'.")

    def run(self, prompts: list[list[int]], params: SamplingParams, seed: int, sample_ids: list[int], progress: bool = False) -> RolloutResult:
        stats: list[InstanceStats] = []
        start = time.perf_counter()
        outs = generate(
            self.policy, prompts, params, seed, batch_size=self.batch_size, tokenizer=self.tokenizer, progress=progress,
            sample_ids=sample_ids, drafter=self.drafters or None, strategy=self.strategy, instance_stats=stats,
        )
        # The drafter objects persist, so an n-gram drafter keeps this iteration's responses for the next.
        return RolloutResult(outs, stats, time.perf_counter() - start)

    def draft_models(self) -> list[DraftModelDrafter]:
        return [d for d in self.drafters if isinstance(d, DraftModelDrafter)]
