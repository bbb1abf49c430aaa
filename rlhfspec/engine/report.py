"""What an instance reports to whoever drives it, what it measures about itself, and what a
sample migrating to another instance carries."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhfspec.engine.sequence import Sequence
from rlhfspec.strategy.base import StepRecord


@dataclass(slots=True)
class Migrant:
    """A live sample leaving one instance for another: its state, and its KV rows unless the
    destination is to recompute them (policy rows [layers, n, kv_heads, head_dim] each), what each
    drafter exported for it (by name) and what the strategy learned about it."""

    seq: Sequence
    kv: tuple[torch.Tensor, torch.Tensor] | None = None
    drafters: dict[str, object] = field(default_factory=dict)
    strategy: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        parts = [self.kv, *self.drafters.values()]
        tensors = [t for p in parts if isinstance(p, tuple) for t in p if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(slots=True)
class InstanceReport:
    """What an instance tells whoever drives it after running some steps: the samples that
    finished, the live ones (enough to recompute them elsewhere), and its measured costs."""

    finished: list[Sequence]
    live: list[Sequence]
    free_slots: int
    busy_s: float  # seconds spent stepping in this call
    steps: int
    step_seconds: dict[int, float]  # mean seconds per step (selector included) by live batch size
    tokens_per_step: float
    prefill_seconds_per_token: float | None  # measured over this instance's prefills so far
    kv_bytes_per_token: float  # policy and draft-model KV rows one token occupies


@dataclass(slots=True)
class InstanceStats:
    steps: int = 0
    prefill_tokens: int = 0  # computed: a prompt shared by samples admitted together counts once
    shared_prefill_tokens: int = 0  # prompt tokens copied from such a sample instead
    emitted: int = 0
    proposed: int = 0
    accepted: int = 0
    forward_s: float = 0.0
    prefill_s: float = 0.0  # prefills and recomputed migrants, timed whole
    records: list[StepRecord] = field(default_factory=list)
    by_batch: dict[int, list[float]] = field(default_factory=dict)  # live batch -> [seconds, steps]
    slots: int = 0  # sample-steps: live samples summed over steps
    step_emitted: int = 0  # tokens emitted by decode steps (prefill draws not counted)

    def record(self, r: StepRecord) -> None:
        self.steps += 1
        self.records.append(r)
        self.slots += r.batch
        self.step_emitted += r.emitted
        total = self.by_batch.setdefault(r.batch, [0.0, 0])
        total[0] += r.seconds
        total[1] += 1

    @property
    def step_seconds(self) -> dict[int, float]:
        """Mean seconds of a step (decision, drafting and verification) by live batch size."""
        return {b: t / c for b, (t, c) in self.by_batch.items()}

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def tokens_per_step(self) -> float:
        """Tokens a sample gains per decode step (1 for plain decoding)."""
        return self.step_emitted / self.slots if self.slots else 0.0


def time_split(stats: list[InstanceStats]) -> dict:
    """Where a rollout's recorded seconds went, summed over its instances: steps (and speculative
    ones), prefills, drafting, verification (a plain step's forward and sampling included) and the
    strategy's decisions. A real run's and a simulated one's come out alike, so they compare."""
    records = [r for st in stats for r in st.records]
    return {"steps": len(records), "speculative_steps": sum(1 for r in records if r.drafter is not None),
            "prefill_s": sum(st.prefill_s for st in stats), "draft_s": sum(r.draft_s for r in records),
            "verify_s": sum(r.verify_s for r in records), "decide_s": sum(r.decide_s for r in records)}
