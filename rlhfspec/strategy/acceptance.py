"""Acceptance estimates per drafter and per sample, and the tokens a draft of n is expected to yield."""

from __future__ import annotations

from dataclasses import dataclass, field


def expected_tokens_upto(rates: list[float]) -> list[float]:
    """Tokens a step emits for drafts of k = 0..len(rates) when draft j is accepted with probability
    rates[j-1] given all before it were: [1, 1 + a_1, 1 + a_1 + a_1 a_2, ...]."""
    out, reach, total = [1.0], 1.0, 1.0
    for a in rates:
        reach *= a
        total += reach
        out.append(total)
    return out


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

    def position_rates(self, priors: list[float], strength: float) -> list[float]:
        """Acceptance at each position j < len(priors) given the ones before it were accepted, each
        with a Beta prior of mean priors[j] and weight `strength`."""
        n = len(self.reached)
        return [(self.accepted[j] + p * strength) / (self.reached[j] + strength) if j < n else p for j, p in enumerate(priors)]

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
    policy. Tokens per step are priced per position (`expected_upto`): a drafter's acceptance at
    draft j given the ones before it were accepted, shrunk toward its pooled rate (an eagle head
    accepts its first draft far more often than the next ones; a tree's first position holds
    several candidates), and a sample's own per position toward the drafter's. The pooled `rate`
    decides which samples draft at all.
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

    def position_rates(self, drafter: str, sample: int | None, n: int) -> list[float]:
        """a_1..a_n: acceptance of draft j given drafts 1..j-1 were accepted."""
        return self.position_rates_of(drafter, [sample], n)[0]

    def position_rates_of(self, drafter: str, samples: list[int | None], n: int) -> list[list[float]]:
        """position_rates(drafter, s, n) for every s, with the drafter's own computed once."""
        base = self.rate(drafter)
        d = self.drafters.get(drafter)
        own = [base] * n if d is None else d.position_rates([base] * n, self.strength)
        out = []
        for sid in samples:
            c = None if sid is None else self.samples.get(sid, {}).get(drafter)
            out.append(own if c is None else c.position_rates(own, self.strength))
        return out

    def expected_upto(self, drafter: str, sample: int | None, n: int) -> list[float]:
        """Expected tokens of one step drafting k = 0..n tokens for this sample."""
        return expected_tokens_upto(self.position_rates(drafter, sample, n))

    def expected(self, drafter: str, sample: int | None, n: int) -> float:
        """Expected tokens emitted by one step that drafts n tokens for this sample."""
        return 1.0 if n <= 0 else self.expected_upto(drafter, sample, n)[n]

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
