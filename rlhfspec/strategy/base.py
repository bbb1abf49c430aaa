"""The plain data a strategy sees and returns, and the static strategy."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Workload:
    """What a strategy knows before a step: the live samples, their context lengths and how many
    tokens each may still emit, and the drafters the instance has (with the chains per sample of
    those that draft trees: a draft of n then verifies branches * n tokens per sample)."""

    sample_ids: list[int]
    context_lens: list[int]
    remaining: list[int]
    drafters: list[str]
    branches: dict[str, int] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return len(self.sample_ids)

    def width(self, drafter: str) -> int:
        """Chains per sample `drafter` verifies (1: a chain)."""
        return self.branches.get(drafter, 1)

    @classmethod
    def of(cls, live, drafters, branches: dict[str, int] | None = None) -> Workload:
        """The workload of live samples (anything with sample_id, length and remaining, in slot
        order) on an instance with these drafters: what the engine and the simulator both decide on."""
        return cls([s.sample_id for s in live], [s.length for s in live], [s.remaining for s in live], list(drafters),
                   {k: v for k, v in (branches or {}).items() if v != 1})


def clipped_draft_lengths(n: list[int], remaining: list[int]) -> list[int]:
    """Draft lengths a step can use: a sample that may emit r more tokens drafts at most r - 1
    (the verify step adds one token of its own)."""
    return [max(0, min(k, r - 1)) for k, r in zip(n, remaining)]


@dataclass(slots=True)
class Decision:
    """Draft with `drafter` (None: plain decoding) and n[b] tokens for live sample b."""

    drafter: str | None
    n: list[int]


@dataclass(slots=True)
class StepRecord:
    """What one step did and cost; strategies learn from it and plots are drawn from it.

    n: draft lengths asked for; drafted: what the drafter proposed (an n-gram drafter may find
    fewer; for a tree, the depth of each of its `branches` chains); accepted: drafts kept per
    sample; decide_s: the strategy's own time choosing this step (part of the step's cost, not of
    any forward)."""

    batch: int
    drafter: str | None
    n: list[int]
    drafted: list[int]
    accepted: list[int]
    emitted: int
    draft_s: float
    verify_s: float
    context_len: float
    sample_ids: list[int] = field(default_factory=list)
    start_s: float = 0.0  # seconds since the run began
    decide_s: float = 0.0
    branches: int = 1

    @property
    def tokens_per_row(self) -> float:
        """Mean tokens per sample the verification forward fed."""
        return sum(self.branches * d + 1 for d in self.drafted) / self.batch

    @property
    def seconds(self) -> float:
        return self.decide_s + self.draft_s + self.verify_s


class Strategy:
    """Chooses a Decision for each step and observes what it did.

    Per-sample contract, driven by the instance: `export` when a live sample migrates away (then
    `forget`), `adopt` on the instance it arrives at, `forget` when it finishes. `state_dict` is
    what persists across RL iterations (checkpoints); it is plain JSON.
    """

    def decide(self, workload: Workload) -> Decision:
        raise NotImplementedError

    def observe(self, record: StepRecord) -> None:
        """Learn from a finished step (default: nothing)."""

    def export(self, sample_id: int) -> dict:
        """What this strategy learned about one live sample, to travel with it (default: nothing)."""
        return {}

    def adopt(self, sample_id: int, state: dict) -> None:
        """Take over a migrated sample's exported state (default: ignore it)."""

    def forget(self, sample_id: int) -> None:
        """The sample finished or left this instance: drop what is kept for it (default: nothing kept)."""

    def state_dict(self) -> dict:
        """What this strategy learned that outlives samples, as plain JSON (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a state_dict (default: nothing to load)."""


class StaticStrategy(Strategy):
    """The same drafter and draft length at every step (n = 0 or no drafter: plain decoding)."""

    def __init__(self, drafter: str | None, n: int):
        self.drafter, self.n = drafter, n

    def decide(self, workload: Workload) -> Decision:
        if self.drafter is None or self.n == 0:
            return Decision(None, [0] * workload.batch)
        return Decision(self.drafter, [self.n] * workload.batch)
