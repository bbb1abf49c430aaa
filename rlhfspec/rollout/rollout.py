"""One interface for the generation stage; flags switch speculative decoding, the adaptive strategy
and (with several instances) sample reallocation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rlhfspec.engine.drafters import DraftModelDrafter, Drafter, NgramDrafter
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
                 drafters: list[Drafter] | None = None, num_draft_tokens: int = 4, instances: int = 1, realloc: bool = False,
                 backend: str = "inproc", batch_invariant: bool = True):
        if instances < 1:
            raise RlhfspecError(f"generation.instances must be at least 1, got {instances}.")
        if backend != "inproc":
            raise RlhfspecError(f"the RL generation stage runs its instances in-process (backend 'inproc'), not {backend!r}: "
                                "Ray actors would need the policy's weights shipped to them after every update.")
        if strategy not in ("adaptive", "static"):
            raise RlhfspecError(f"generation strategy {strategy!r} is not 'adaptive' or 'static'.")
        self.policy, self.tokenizer, self.batch_size = policy, tokenizer, batch_size
        self.kind, self.num_draft_tokens = strategy, num_draft_tokens
        self.instances, self.realloc, self.batch_invariant = instances, realloc, batch_invariant
        self.drafters = list(drafters or []) if spec else []
        # Instance 0 drafts with the drafters given (they persist across iterations); the others
        # with their own drafter objects over the same draft weights. Strategies persist too.
        self.instance_drafters = [self.drafters] + [[_twin(d) for d in self.drafters] for _ in range(instances - 1)]
        self.strategies = [self._strategy(ds) for ds in self.instance_drafters]

    def _strategy(self, drafters: list[Drafter]) -> Strategy | None:
        if not drafters:
            return None
        if self.kind == "adaptive":
            return adaptive_strategy(self.policy, drafters)
        return StaticStrategy(drafters[0].name, self.num_draft_tokens)

    def run(self, prompts: list[list[int]], params: SamplingParams, seed: int, sample_ids: list[int], progress: bool = False) -> RolloutResult:
        stats: list[InstanceStats] = []
        start = time.perf_counter()
        if self.instances > 1:
            outs = self._run_multi(prompts, params, seed, sample_ids, stats, progress)
            return RolloutResult(outs, stats, time.perf_counter() - start)
        outs = generate(
            self.policy, prompts, params, seed, batch_size=self.batch_size, tokenizer=self.tokenizer, progress=progress,
            sample_ids=sample_ids, drafter=self.drafters or None, strategy=self.strategies[0], instance_stats=stats,
            batch_invariant=self.batch_invariant,
        )
        # The drafter objects persist, so an n-gram drafter keeps this iteration's responses for the next.
        return RolloutResult(outs, stats, time.perf_counter() - start)

    def _run_multi(self, prompts, params, seed, sample_ids, stats: list, progress: bool) -> list[GenerationOutput]:
        from rlhfspec.rollout.inproc import InprocBackend
        from rlhfspec.rollout.local import LocalInstance
        from rlhfspec.rollout.multi import MultiConfig, generate_multi, instance_batch
        from rlhfspec.rollout.spec import InstanceSpec

        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        per_instance = instance_batch(len(prompts), self.instances, self.batch_size)

        def make(i: int) -> LocalInstance:
            return LocalInstance(i, self.policy, per_instance, max_len, tokenizer=self.tokenizer,
                                 drafters=self.instance_drafters[i], strategy=self.strategies[i], batch_invariant=self.batch_invariant)

        backend = InprocBackend(make, self.instances)
        cfg = MultiConfig(instances=self.instances, realloc=self.realloc)
        spec = InstanceSpec(model="(in-process policy)", max_batch=per_instance, max_len=max_len, batch_invariant=self.batch_invariant)
        outs, _ = generate_multi(spec, prompts, params, seed, cfg, sample_ids=list(sample_ids), backend=backend, progress=progress)
        stats.extend(inst.instance.stats for inst in backend.instances)
        return outs

    def draft_models(self) -> list[DraftModelDrafter]:
        return [d for d in self.drafters if isinstance(d, DraftModelDrafter)]


def _twin(d: Drafter) -> Drafter:
    """A drafter of the same kind for another instance (a draft model's weights are shared, not copied)."""
    if isinstance(d, DraftModelDrafter):
        vocab = None if d.vocab is None else d.vocab.tolist()
        return DraftModelDrafter(d.model, draft_vocab=vocab, name=d.name)
    if isinstance(d, NgramDrafter):
        return NgramDrafter()
    raise RlhfspecError(f"drafter {d.name!r} cannot be replicated across generation instances.")
