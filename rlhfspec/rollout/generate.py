"""`generate`: complete prompts on K >= 1 generation instances described by one EngineSpec.

Every path (one instance or several, in-process or Ray, the Python API, the CLI, the RL loop,
the benchmarks) goes through `run_generation`: one queue, one Coordinator, one Backend.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlhfspec.engine.drafters import DraftModelDrafter, Drafter, EagleDrafter
from rlhfspec.engine.report import InstanceStats
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.sequence import GenerationOutput, Sequence
from rlhfspec.engine.spec import DEFAULT_MAX_BATCH, STRATEGIES, EngineSpec, StrategySpec, check_draft_length, drafter_spec, strategy_spec
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.eagle import EagleHead
from rlhfspec.models.llama import Transformer
from rlhfspec.rollout.backend import Backend, InprocBackend
from rlhfspec.rollout.coordinator import Coordinator, Timeline
from rlhfspec.rollout.rebalance import Rebalancer
from rlhfspec.strategy.base import Strategy

if TYPE_CHECKING:
    from rlhfspec.rollout.ray_backend import RayBackend

BACKENDS = ("inproc", "ray")


@dataclass
class Placement:
    """Where the instances run and how samples move between them."""

    instances: int = 1
    backend: str = "inproc"  # "inproc" (one process, deterministic) or "ray" (one actor per instance)
    realloc: bool = True  # migrate in-flight samples between instances (K > 1)
    ray_address: str | None = None  # join this Ray cluster instead of starting a local one
    gpus_per_instance: float = 0.0
    steps_per_call: int | None = None  # steps an instance runs between reports (default 1 for one in-process instance, else 4)
    migration: str = "auto"  # "auto" (cheaper of KV transfer and recompute), "kv" or "recompute"

    def __post_init__(self):
        if self.instances < 1:
            raise RlhfspecError(f"instances must be at least 1, got {self.instances}.")
        if self.backend not in BACKENDS:
            raise RlhfspecError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}.")

    @property
    def steps(self) -> int:
        if self.steps_per_call is not None:
            return self.steps_per_call
        return 1 if self.instances == 1 and self.backend == "inproc" else 4


@dataclass
class Generation:
    """What a generation call produced: outputs in prompt order, the in-process instances' stats
    (step records included), the coordinator's timeline, and the wall time."""

    outputs: list[GenerationOutput]
    stats: list[InstanceStats]
    timeline: Timeline
    seconds: float
    tokens: int = field(init=False)

    def __post_init__(self):
        self.tokens = sum(len(o.token_ids) for o in self.outputs)

    @property
    def acceptance(self) -> float | None:
        proposed = sum(s.proposed for s in self.stats)
        return sum(s.accepted for s in self.stats) / proposed if proposed else None

    def _by_drafter(self) -> dict[str, list[int]]:
        """Per drafter: [tokens accepted, tokens drafted, samples drafted for], over every step."""
        totals: dict[str, list[int]] = {}
        for s in self.stats:
            for r in s.records:
                if r.drafter is not None:
                    t = totals.setdefault(r.drafter, [0, 0, 0])
                    t[0] += sum(r.accepted)
                    t[1] += sum(r.drafted)
                    t[2] += sum(1 for d in r.drafted if d)
        return totals

    def acceptance_by_drafter(self) -> dict[str, float]:
        return {k: a / p for k, (a, p, _) in self._by_drafter().items() if p}

    def chain_length_by_drafter(self) -> dict[str, float]:
        """Mean tokens a drafter proposed per sample it drafted for (a tree's: per chain)."""
        return {k: p / rows for k, (_, p, rows) in self._by_drafter().items() if rows}


# Live drafters and strategy of one in-process instance (an RL rollout keeps them across iterations).
Live = tuple[list[Drafter], Strategy | None]


def checked_sample_ids(sample_ids: Seq[int] | None, n: int) -> list[int]:
    """The ids keying each prompt's randomness: 0..n-1 by default, else n distinct integers."""
    ids = list(range(n)) if sample_ids is None else list(sample_ids)
    if len(set(ids)) != len(ids) or len(ids) != n:
        raise RlhfspecError(f"sample_ids must be {n} distinct integers, one per prompt.")
    return ids


def make_backend(spec: EngineSpec, placement: Placement, model=None, tokenizer=None, live: list[Live] | None = None) -> Backend:
    """In-process instances share one loaded model (and the live drafters and strategies handed
    in, one pair per instance); Ray actors each build their own from the spec."""
    if placement.backend == "ray":
        if live is not None:
            raise RlhfspecError("the ray backend builds each instance's drafters and strategy in its actor; "
                                "describe them in the engine spec instead of passing objects.")
        from rlhfspec.rollout.ray_backend import RayBackend

        return RayBackend(spec, placement.instances, address=placement.ray_address, gpus_per_actor=placement.gpus_per_instance)
    if model is None:
        from rlhfspec.models.loader import load_model

        model, tokenizer = load_model(spec.model or "default", dtype=spec.dtype)

    def build(i: int, fitted: EngineSpec):
        drafters, strategy = live[i] if live is not None else (None, None)
        return fitted.build(model, tokenizer, drafters=drafters, strategy=strategy)

    return InprocBackend(lambda i: build(i, spec), placement.instances, build)


def run_generation(spec: EngineSpec, prompts: Seq[Seq[int]], params: SamplingParams, seed: int = 0, *,
                   placement: Placement | None = None, model=None, tokenizer=None, sample_ids: Seq[int] | None = None,
                   live: list[Live] | None = None, backend: Backend | RayBackend | None = None, progress: bool = False) -> Generation:
    """Complete the prompts (token ids) on placement.instances instances built from `spec`.

    Sample i's randomness is keyed by (seed, sample_ids[i], position), and with a batch-invariant
    spec a row's logits do not depend on its batch, so its tokens are the same on one instance or
    several, whatever the migrations. A backend passed in (the RL loop's Ray actors, or one from
    make_backend) is fitted to this call (`begin`), reused and not shut down."""
    placement = placement or Placement()
    start = time.perf_counter()
    if not prompts:
        return Generation([], [], Timeline(), 0.0)
    for i, p in enumerate(prompts):
        if isinstance(p, str) or not all(isinstance(t, int) or (hasattr(t, "__index__") and not isinstance(t, float)) for t in p):
            raise RlhfspecError(f"prompt {i} is {type(p).__name__} {str(p)[:40]!r}, not a list of token ids; "
                                "encode text first (rlhfspec.data.chat.encode_prompt(tokenizer, text)).")
    ids = checked_sample_ids(sample_ids, len(prompts))
    seqs = [Sequence(sid, [int(t) for t in p], params, seed) for sid, p in zip(ids, prompts)]
    longest = max(len(s.prompt) for s in seqs)
    if model is not None:
        limit = model.config.max_position_embeddings
        if longest + params.max_new_tokens > limit:
            worst = max(seqs, key=lambda s: len(s.prompt))
            raise RlhfspecError(f"prompt {worst.sample_id} is {len(worst.prompt)} tokens; with max_new_tokens "
                                f"{params.max_new_tokens} it exceeds the model's {limit} positions.")
    if spec.max_len is not None and longest + params.max_new_tokens > spec.max_len:
        raise RlhfspecError(f"prompt length {longest} + max_new_tokens {params.max_new_tokens} exceeds the instances' max_len {spec.max_len}.")
    spec = spec.fitted(longest + params.max_new_tokens, -(-len(seqs) // placement.instances))
    if live is not None and len(live) != placement.instances:
        raise RlhfspecError(f"{len(live)} sets of live drafters for {placement.instances} instances.")
    owned = backend is None
    if owned:
        backend = make_backend(spec, placement, model, tokenizer, live)
    else:
        backend.begin(spec)  # instances kept from an earlier call, fitted to this one
    try:
        backend.validate(seqs)
        rebalancer = Rebalancer() if placement.realloc and placement.instances > 1 else None
        coordinator = Coordinator(backend, rebalancer, steps_per_call=placement.steps, mode=placement.migration,
                                  max_new_tokens=params.max_new_tokens, progress=progress)
        done = coordinator.run(seqs)
        stats = backend.stats()
    finally:
        if owned:
            backend.shutdown()
    return Generation([GenerationOutput.of(s) for s in done], stats, coordinator.timeline, time.perf_counter() - start)


def generate(
    model,
    prompts_token_ids: Seq[Seq[int]],
    params: SamplingParams | None = None,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    tokenizer=None,
    progress: bool = False,
    sample_ids: Seq[int] | None = None,
    drafter=None,
    num_draft_tokens: int | str | None = None,
    strategy: Strategy | str | None = None,
    instance_stats: list | None = None,
    batch_invariant: bool = True,
    placement: Placement | None = None,
) -> list[GenerationOutput]:
    """Complete each prompt (token ids); outputs in prompt order.

    Up to `batch_size` samples run at once per instance (default min(64, #prompts / instances)); a finished
    sample's slot is refilled from the queue. Sample i's randomness is keyed by (seed,
    sample_ids[i], position) (sample_ids default to 0..n-1), so its tokens do not depend on
    batch_size, on which other prompts run beside it, or on the instance it runs on.

    drafter: None, "ngram", "draft", "eagle", a draft model or eagle head directory, a model from
    `load_model`, an `EagleHead`, a `Drafter`, or a list of these; num_draft_tokens: draft length per step (default 4), or "auto" to let the adaptive
    strategy pick the drafter and length at every step (as strategy="adaptive" does; "static" and
    "threshold" are the other names, or pass a Strategy object). Speculative decoding is
    lossless: the tokens follow the policy's own sampling distribution and `logprobs` are the policy's.

    batch_invariant (default): every row's logits are bitwise the same whatever else is in the
    step, so a sample's tokens do not depend on its batch on any CPU; False takes the faster
    kernels, under which tokens agree except where a last-bit difference flips a near-tie.

    placement: several instances (in-process or Ray actors) with sample reallocation between them.
    """
    params = params or SamplingParams()
    placement = placement or Placement()
    spec, live = engine_spec(model, tokenizer, drafter=drafter, num_draft_tokens=num_draft_tokens, strategy=strategy,
                             batch_size=batch_size, batch_invariant=batch_invariant, instances=placement.instances)
    if placement.backend == "ray" and isinstance(model, Transformer):
        raise RlhfspecError("the ray backend's actors load their own model; use rlhfspec.rollout.run_generation with an EngineSpec naming it.")
    result = run_generation(spec, prompts_token_ids, params, seed, placement=placement, model=model, tokenizer=tokenizer,
                            sample_ids=sample_ids, live=live, progress=progress)
    if instance_stats is not None:
        instance_stats.extend(result.stats)
    return result.outputs


def engine_spec(model, tokenizer=None, *, drafter=None, num_draft_tokens: int | str | None = None, strategy=None,
                batch_size: int | None = None, batch_invariant: bool = True, instances: int = 1) -> tuple[EngineSpec, list[Live] | None]:
    """The EngineSpec `generate`'s arguments describe, and live drafters and strategies (one pair
    per instance) when objects were passed rather than names."""
    if batch_size is not None and batch_size < 1:
        raise RlhfspecError(f"batch_size is {batch_size}; it must be at least 1.")
    entries = [] if drafter is None else list(drafter) if isinstance(drafter, (list, tuple)) else [drafter]
    specs: list = []  # the entries' descriptions, or the objects themselves, in entry order
    for d in entries:
        if isinstance(d, Drafter):
            specs.append(d)
        elif isinstance(d, (str, Path)):
            specs.append(drafter_spec(str(d), tuple(s.name for s in specs)))
        elif isinstance(d, Transformer):
            specs.append(DraftModelDrafter(d, model))
        elif isinstance(d, EagleHead):
            specs.append(EagleDrafter(d, model))
        else:
            raise RlhfspecError(f"drafter {d!r} is not 'ngram', 'eagle', a draft model or eagle head path, a model from load_model, "
                                "an EagleHead, or a Drafter.")
    if strategy is not None and not isinstance(strategy, (str, Strategy)) or isinstance(strategy, str) and strategy not in STRATEGIES:
        raise RlhfspecError(f"strategy {strategy!r} is not one of {', '.join(map(repr, STRATEGIES))} or a Strategy object.")
    live_strategy = strategy if isinstance(strategy, Strategy) else None
    kind = "adaptive" if num_draft_tokens == "auto" else strategy if isinstance(strategy, str) else "static"
    n = 4 if num_draft_tokens in (None, "auto") else num_draft_tokens
    check_draft_length(n)
    desc = strategy_spec(kind, tuple(specs), n, required=kind == "adaptive")
    batch = batch_size or DEFAULT_MAX_BATCH
    if all(not isinstance(d, Drafter) for d in specs) and live_strategy is None:
        return EngineSpec(tuple(specs), desc, batch, batch_invariant=batch_invariant), None
    # Objects were passed: every instance gets live drafters (replicas beyond the first) and a strategy.
    if live_strategy is not None and instances > 1:
        raise RlhfspecError("a Strategy object drives one instance; with several, pass strategy='adaptive', 'static' or 'threshold'.")
    first = [d if isinstance(d, Drafter) else d.build(model, tokenizer) for d in specs]
    names = [d.name for d in first]
    if len(set(names)) != len(names):
        raise RlhfspecError(f"drafters need distinct names; got {names}.")
    spec = EngineSpec(max_batch=batch, batch_invariant=batch_invariant)
    if live_strategy is not None:
        return spec, [(first, live_strategy)]
    return spec, live_parts(first, desc, model, instances)


def live_parts(drafters: list[Drafter], strategy: StrategySpec | None, policy, instances: int) -> list[Live]:
    """Live drafters and a strategy for each of `instances` in-process instances: `drafters` for
    the first, replicas over the same weights for the others, each with its own strategy."""
    out: list[Live] = []
    for i in range(instances):
        ds = drafters if i == 0 else [d.replica() for d in drafters]
        out.append((ds, strategy.build(policy, ds) if strategy is not None else None))
    return out


__all__ = ["EngineSpec", "Generation", "Placement", "generate", "run_generation"]
