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


def expected_tokens_upto(alpha: float, n: int) -> list[float]:
    """[expected_tokens(alpha, k) for k in 0..n], bit for bit, without a call per k."""
    if alpha >= 1.0:
        return [float(k + 1) for k in range(n + 1)]
    rest = 1.0 - alpha
    return [1.0] + [(1.0 - alpha**k) / rest for k in range(2, n + 2)]


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

    def to_json(self) -> dict[str, list[float]]:
        return {"reached": list(self.reached), "accepted": list(self.accepted)}

    @classmethod
    def from_json(cls, data: dict) -> _Counts:
        return cls([float(x) for x in data["reached"]], [float(x) for x in data["accepted"]])


class AcceptanceEstimator:
    """Per-drafter and per-sample acceptance rates, updated from every step's accept counts.

    A sample's rate is shrunk toward its drafter's rate (a Beta prior worth `prior_strength`
    draft tokens), so a new sample starts at the drafter's rate and moves to its own as evidence
    accrues. Old drafter-level evidence decays (`decay` per update) so estimates follow a drifting
    policy. Tokens per step follow the geometric model, `expected_tokens(rate, n)`.
    """

    def __init__(self, prior: float = 0.5, prior_strength: float = 8.0, decay: float = 0.995):
        self.prior, self.strength, self.decay_factor = prior, prior_strength, decay
        self.drafters: dict[str, _Counts] = {}
        self.samples: dict[int, dict[str, _Counts]] = {}  # sample id -> drafter -> counts

    def rate(self, drafter: str, sample: int | None = None) -> float:
        d = self.drafters.get(drafter)
        base = self.prior if d is None else d.rate(self.prior, self.strength)
        if sample is None:
            return base
        s = self.samples.get(sample, {}).get(drafter)
        return base if s is None else s.rate(base, self.strength)

    def rates(self, drafter: str, samples: list[int]) -> list[float]:
        """rate(drafter, s) for every s, with the drafter's own rate computed once."""
        base = self.rate(drafter)
        out = []
        for sid in samples:
            s = self.samples.get(sid)
            c = None if s is None else s.get(drafter)
            out.append(base if c is None else c.rate(base, self.strength))
        return out

    def expected(self, drafter: str, sample: int | None, n: int) -> float:
        """Expected tokens emitted by one step that drafts n tokens for this sample."""
        return 1.0 if n <= 0 else expected_tokens(self.rate(drafter, sample), n)

    def update(self, drafter: str, sample_ids: list[int], proposed: list[int], accepted: list[int]) -> None:
        """Record one step: sample_ids[b] proposed `proposed[b]` drafts and kept `accepted[b]`."""
        d = self.drafters.setdefault(drafter, _Counts())
        for sid, n, a in zip(sample_ids, proposed, accepted):
            if n <= 0:
                continue
            d.add(n, a)
            self.samples.setdefault(sid, {}).setdefault(drafter, _Counts()).add(n, a)
        d.decay(self.decay_factor)

    def forget(self, sample_id: int) -> None:
        """Drop a sample's statistics (it finished or left this instance)."""
        self.samples.pop(sample_id, None)

    def export(self, sample_id: int) -> dict[str, dict[str, list[float]]]:
        """A sample's own counts per drafter, as plain JSON, to travel with it to another instance."""
        return {name: c.to_json() for name, c in self.samples.get(sample_id, {}).items()}

    def adopt(self, sample_id: int, state: dict[str, dict[str, list[float]]]) -> None:
        """Take over counts exported elsewhere (they replace any this estimator held for the sample)."""
        if state:
            self.samples[sample_id] = {name: _Counts.from_json(c) for name, c in state.items()}

    def state_dict(self) -> dict:
        """Drafter-level counts (per-sample counts end with their samples and are not kept)."""
        return {"drafters": {name: c.to_json() for name, c in self.drafters.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.drafters = {name: _Counts.from_json(c) for name, c in state.get("drafters", {}).items()}
