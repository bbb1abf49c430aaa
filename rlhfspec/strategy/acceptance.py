"""Acceptance estimates per drafter and per sample, and the tokens a draft of n is expected to yield."""

from __future__ import annotations

from dataclasses import dataclass, field


def expected_tokens(alpha: float, n: int) -> float:
    """Tokens one step emits for a draft of n when each draft token is accepted with probability alpha,
    independently, until the first rejection: 1 + alpha + ... + alpha^n = (1 - alpha^(n+1)) / (1 - alpha)."""
    if n <= 0:
        return 1.0
    if alpha >= 1.0:
        return float(n + 1)
    return (1.0 - alpha ** (n + 1)) / (1.0 - alpha)


@dataclass(slots=True)
class _Counts:
    """Draft positions j = 1, 2, ...: how often a draft reached j (was proposed with all before it accepted)
    and how often d_j itself was accepted."""

    reached: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def add(self, proposed: int, accepted: int, weight: float = 1.0) -> None:
        for j in range(proposed):
            if j >= len(self.reached):
                self.reached.append(0.0)
                self.accepted.append(0.0)
            if j > accepted:
                break
            self.reached[j] += weight
            if j < accepted:
                self.accepted[j] += weight

    def rate(self, prior: float, strength: float) -> float:
        """Pooled per-token acceptance with a Beta prior of mean `prior` and weight `strength`."""
        return (sum(self.accepted) + prior * strength) / (sum(self.reached) + strength)

    def decay(self, factor: float) -> None:
        self.reached = [x * factor for x in self.reached]
        self.accepted = [x * factor for x in self.accepted]


class AcceptanceEstimator:
    """Per-drafter and per-sample acceptance rates, updated from every step's accept counts.

    A sample's rate is shrunk toward its drafter's rate (a Beta prior worth `prior_strength`
    draft tokens), so a new sample starts at the drafter's rate and moves to its own as evidence
    accrues. Old evidence decays (`decay` per update) so estimates follow a drifting policy.
    `expected(drafter, sample, n)` uses the geometric model, or the drafter's empirical
    per-position survival when `empirical` is set (both are scored by `prediction_error`).
    """

    def __init__(self, prior: float = 0.5, prior_strength: float = 8.0, decay: float = 0.995, empirical: bool = False):
        self.prior, self.strength, self.decay_factor, self.empirical = prior, prior_strength, decay, empirical
        self.drafters: dict[str, _Counts] = {}
        self.samples: dict[tuple[str, int], _Counts] = {}
        self.errors = {"geometric": [0.0, 0], "empirical": [0.0, 0]}

    def rate(self, drafter: str, sample: int | None = None) -> float:
        d = self.drafters.get(drafter)
        base = self.prior if d is None else d.rate(self.prior, self.strength)
        if sample is None:
            return base
        s = self.samples.get((drafter, sample))
        return base if s is None else s.rate(base, self.strength)

    def expected(self, drafter: str, sample: int | None, n: int) -> float:
        """Expected tokens emitted by one step that drafts n tokens for this sample."""
        return self._predict(drafter, sample, n, self.empirical)

    def _predict(self, drafter: str, sample: int | None, n: int, empirical: bool) -> float:
        if n <= 0:
            return 1.0
        if empirical and drafter in self.drafters:
            return self._empirical(drafter, sample, n)
        return expected_tokens(self.rate(drafter, sample), n)

    def _empirical(self, drafter: str, sample: int | None, n: int) -> float:
        d = self.drafters[drafter]
        scale = self.rate(drafter, sample) / max(self.rate(drafter), 1e-9)
        total, survive = 1.0, 1.0
        for j in range(n):
            reached = d.reached[j] if j < len(d.reached) else 0.0
            acc = d.accepted[j] if j < len(d.accepted) else 0.0
            p = (acc + self.prior * self.strength) / (reached + self.strength)
            survive *= min(1.0, p * scale)
            total += survive
        return total

    def update(self, drafter: str, sample_ids: list[int], proposed: list[int], accepted: list[int]) -> None:
        """Record one step: sample_ids[b] proposed `proposed[b]` drafts and kept `accepted[b]`."""
        d = self.drafters.setdefault(drafter, _Counts())
        for sid, n, a in zip(sample_ids, proposed, accepted):
            if n <= 0:
                continue
            for name, empirical in (("geometric", False), ("empirical", True)):
                err = self._predict(drafter, sid, n, empirical) - (a + 1)
                self.errors[name][0] += err * err
                self.errors[name][1] += 1
            d.add(n, a)
            self.samples.setdefault((drafter, sid), _Counts()).add(n, a)
        d.decay(self.decay_factor)

    def forget(self, sample_id: int) -> None:
        """Drop a finished sample's statistics."""
        for key in [k for k in self.samples if k[1] == sample_id]:
            del self.samples[key]

    def sample_state(self, sample_id: int) -> dict[str, tuple[list[float], list[float]]]:
        """A sample's own counts per drafter, to travel with it to another instance."""
        return {k[0]: (list(c.reached), list(c.accepted)) for k, c in self.samples.items() if k[1] == sample_id}

    def restore_sample(self, sample_id: int, state: dict[str, tuple[list[float], list[float]]]) -> None:
        for drafter, (reached, accepted) in state.items():
            self.samples[(drafter, sample_id)] = _Counts(list(reached), list(accepted))

    def prediction_error(self) -> dict[str, float]:
        """Mean squared error of each model's predicted tokens per step, over every update so far."""
        return {k: (v[0] / v[1] if v[1] else float("nan")) for k, v in self.errors.items()}
