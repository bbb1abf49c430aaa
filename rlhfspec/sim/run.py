"""One simulated rollout, and the feature ablation `rlhfspec simulate` reports.

`simulate` drives the real Coordinator (sharding, refilling, the Rebalancer and its migration
choice) over SimInstances that ask the real strategy (static, threshold or the adaptive selector,
built from the same `engine.spec` descriptions the engine builds them from) at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhfspec.engine.report import time_split
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.sequence import Sequence
from rlhfspec.engine.spec import Adaptive, Static, StrategySpec, Threshold
from rlhfspec.errors import RlhfspecError
from rlhfspec.rollout.coordinator import Coordinator, Timeline
from rlhfspec.rollout.rebalance import Rebalancer
from rlhfspec.sim.cost import StepCost
from rlhfspec.sim.instance import SimBackend, SimInstance
from rlhfspec.sim.workload import AcceptanceProfile
from rlhfspec.strategy.base import Strategy
from rlhfspec.strategy.selector import AdaptiveStrategy


@dataclass
class Workload:
    """The samples of one rollout in the order they are handed out: prompt and response lengths
    (a response ends after its length, or at max_new_tokens), and how drafts are accepted."""

    prompt_lens: list[int]
    lengths: list[int]
    max_new_tokens: int
    acceptance: AcceptanceProfile
    # Which prompt each sample answers (samples of one prompt admitted together share its
    # prefill, as in the engine); None: every sample has a prompt of its own.
    prompt_ids: list[int] | None = None

    def __post_init__(self):
        if len(self.prompt_lens) != len(self.lengths) or not self.lengths:
            raise RlhfspecError(f"the workload has {len(self.prompt_lens)} prompt lengths for {len(self.lengths)} responses; "
                                "it needs one of each per sample, and at least one sample.")
        if self.prompt_ids is not None:
            if len(self.prompt_ids) != len(self.lengths):
                raise RlhfspecError(f"the workload has {len(self.prompt_ids)} prompt ids for {len(self.lengths)} samples; it needs one per sample.")
            length: dict[int, int] = {}
            for i, (p, n) in enumerate(zip(self.prompt_ids, self.prompt_lens)):
                if length.setdefault(p, n) != n:
                    raise RlhfspecError(f"sample {i} answers prompt {p} with a prompt of {n} tokens, but another sample's "
                                        f"prompt {p} has {length[p]}; samples of one prompt share its length.")

    def prompt(self, i: int) -> list[int]:
        """Stand-in token ids of sample i's prompt, equal exactly for samples of one prompt."""
        return [i if self.prompt_ids is None else self.prompt_ids[i]] * self.prompt_lens[i]

    def target(self, i: int) -> int:
        return min(self.lengths[i], self.max_new_tokens)


@dataclass
class Cluster:
    """K instances of `max_batch` live samples each, how often they report (steps per call, as
    `Placement.steps`), how samples migrate and over what link."""

    instances: int = 1
    max_batch: int = 64
    steps_per_call: int | None = None
    migration: str = "auto"
    link_bytes_per_second: float = 50e9
    link_latency_s: float = 1e-4

    def __post_init__(self):
        if self.instances < 1:
            raise RlhfspecError(f"instances must be at least 1, got {self.instances}.")
        if self.max_batch < 1:
            raise RlhfspecError(f"max_batch is {self.max_batch}; it must be at least 1.")

    @property
    def steps(self) -> int:
        return self.steps_per_call or (1 if self.instances == 1 else 4)


@dataclass
class SimRun:
    """What one simulated rollout did: makespan, tokens, each instance's busy seconds and steps."""

    label: str
    makespan_s: float
    tokens: int
    busy_s: list[float]
    moves: int
    steps: int
    speculative_steps: int
    proposed: int
    accepted: int
    tokens_per_step: float
    decide_wall_s: float  # the real selector's CPU time in this process (not part of simulated time)
    timeline: Timeline = field(repr=False)
    busy: list[list[tuple[float, float]]] = field(repr=False)  # per instance, (start, seconds) of all its work
    split: dict = field(default_factory=dict)  # engine.report.time_split of the simulated steps

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.makespan_s if self.makespan_s > 0 else 0.0

    @property
    def utilisation(self) -> list[float]:
        """Each instance's working time (steps, prefills, migrations) over the makespan."""
        return [b / self.makespan_s if self.makespan_s > 0 else 0.0 for b in self.busy_s]

    def utilisation_curve(self, bins: int = 40) -> list[list[float]]:
        """Per instance, the fraction of each of `bins` equal slices of the makespan spent working."""
        width = self.makespan_s / bins if self.makespan_s > 0 else 1.0
        curves = []
        for intervals in self.busy:
            busy = [0.0] * bins
            for t0, seconds in intervals:
                t1 = t0 + seconds
                for k in range(int(t0 // width), min(bins, int(t1 // width) + 1)):
                    busy[k] += max(0.0, min(t1, (k + 1) * width) - max(t0, k * width))
            curves.append([round(b / width, 4) for b in busy])
        return curves


def build_strategy(spec: StrategySpec | None, cost: StepCost, max_batch: int) -> Strategy | None:
    """The real strategy an engine instance would build from this description; the adaptive one
    starts from the profile the engine would measure on this hardware."""
    if spec is None:
        return None
    if isinstance(spec, Adaptive):
        return AdaptiveStrategy(cost.profile(max_batch, spec.max_n), max_n=spec.max_n)
    if isinstance(spec, (Static, Threshold)):
        return spec.build(None, [])
    raise RlhfspecError(f"strategy {spec!r} is not a static, threshold or adaptive description.")


def simulate(cost: StepCost, work: Workload, cluster: Cluster, strategy: StrategySpec | None = None,
             realloc: bool = False, seed: int = 0, label: str = "", drafters: list[str] | None = None) -> SimRun:
    """One rollout of `work` on `cluster` under `strategy` (None: plain decoding), with or without
    reallocation; deterministic for given inputs. `drafters`: the instances' drafters in the
    engine's order (default: those the acceptance profile names)."""
    targets = {i: work.target(i) for i in range(len(work.lengths))}
    drafters = (work.acceptance.drafters if drafters is None else list(drafters)) if strategy is not None else []
    if strategy is not None and not drafters:
        raise RlhfspecError("speculation needs an acceptance profile naming at least one drafter (e.g. --acceptance draft=0.7).")
    if isinstance(strategy, (Static, Threshold)) and strategy.drafter not in drafters:
        raise RlhfspecError(f"the {type(strategy).__name__.lower()} strategy drafts with {strategy.drafter!r}, "
                            f"which has no acceptance profile (drafters: {', '.join(drafters)}).")
    # As run_generation fits the engine spec: no instance takes more than its share of the samples.
    max_batch = max(1, min(cluster.max_batch, -(-len(targets) // cluster.instances)))
    instances = [SimInstance(cost, max_batch, targets, work.acceptance, drafters, build_strategy(strategy, cost, max_batch))
                 for _ in range(cluster.instances)]
    backend = SimBackend(instances, (cluster.link_bytes_per_second, cluster.link_latency_s))
    rebalancer = Rebalancer() if realloc and cluster.instances > 1 else None
    coordinator = Coordinator(backend, rebalancer, steps_per_call=cluster.steps, mode=cluster.migration,
                              max_new_tokens=work.max_new_tokens, clock=backend.clock)
    params = SamplingParams(max_new_tokens=work.max_new_tokens)
    seqs = [Sequence(i, work.prompt(i), params, seed) for i in range(len(work.prompt_lens))]
    done = coordinator.run(seqs)
    for s in done:
        if len(s.tokens) != targets[s.sample_id]:
            raise RlhfspecError(f"simulated sample {s.sample_id} ended with {len(s.tokens)} tokens, not its {targets[s.sample_id]}; "
                                "the simulation lost track of it.")
    stats = backend.stats()
    split = time_split(stats)
    makespan = max([backend.now] + [inst.clock for inst in instances])
    return SimRun(label, makespan, sum(len(s.tokens) for s in done), [sum(t for _, t in inst.busy) for inst in instances],
                  len(coordinator.timeline.moves), split["steps"], split["speculative_steps"],
                  sum(st.proposed for st in stats), sum(st.accepted for st in stats),
                  sum(st.step_emitted for st in stats) / max(1, sum(st.slots for st in stats)),
                  sum(inst.decide_wall_s for inst in instances), coordinator.timeline, [inst.busy for inst in instances],
                  split)
