"""Choose the drafter and draft lengths that maximise expected tokens per second for the next step."""

from __future__ import annotations

from rlhfspec.strategy.acceptance import AcceptanceEstimator, expected_tokens_upto
from rlhfspec.strategy.base import Decision, StepRecord, Strategy, Workload
from rlhfspec.strategy.cost_model import CostModel


def goodput(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


class Selector:
    """argmax over (drafter, n, threshold) of sum_s E[tokens_s | n_s] / (t_draft + t_verify).

    n = 0 (plain decoding) is always a candidate. Per-sample draft lengths: for each (drafter, n)
    the samples whose estimated acceptance is below a threshold draft nothing, and the thresholds
    tried are the distinct estimated rates, so a step can speculate only for the samples it pays
    for. Verification cost is priced at the mean number of tokens per row (branches * n + 1
    for a drafter of trees; its acceptance is counted along the accepted path, so a tree's extra
    branches show up as a higher rate).
    """

    def __init__(self, cost: CostModel, acceptance: AcceptanceEstimator, max_n: int = 8, per_sample: bool = True, max_thresholds: int = 4):
        self.cost, self.acceptance = cost, acceptance
        self.max_n, self.per_sample, self.max_thresholds = max_n, per_sample, max_thresholds

    def evaluate(self, workload: Workload, drafter: str | None, ns: list[int]) -> tuple[float, float]:
        """(expected tokens, predicted seconds) of one step with these draft lengths."""
        b = workload.batch
        if drafter is None or not any(ns):
            return float(b), self.cost.verify(b, 1.0)
        tokens = sum(self.acceptance.expected(drafter, sid, n) for sid, n in zip(workload.sample_ids, ns))
        drafting = self.cost.draft(drafter, sum(1 for n in ns if n), max(ns))
        width = workload.width(drafter)
        return tokens, drafting + self.cost.verify(b, sum(width * n + 1 for n in ns) / b)

    def choose(self, workload: Workload) -> Decision:
        """The best candidate, visited drafter-major, then n ascending, then threshold; a later
        candidate wins only if strictly better. Each candidate's score is computed exactly as
        `evaluate` would (same sums in the same order), from per-sample values computed once."""
        b = workload.batch
        best, best_score = Decision(None, [0] * b), goodput(float(b), self.cost.verify(b, 1.0))
        caps = [min(max(0, r - 1), self.max_n) for r in workload.remaining]
        verify: dict[int, float] = {}  # total tokens in the forward -> seconds
        for drafter in workload.drafters:
            width = workload.width(drafter)
            rates = self.acceptance.rates(drafter, workload.sample_ids)
            # values[s][k]: expected tokens of sample s drafting k <= its cap (priced per position).
            per_position = self.acceptance.position_rates_of(drafter, workload.sample_ids, max(caps, default=0))
            values = [expected_tokens_upto(r[:cap]) for r, cap in zip(per_position, caps)]
            draft: dict[tuple[int, int], float] = {}
            groups = [_Group(rates, caps, tau, self.max_n) for tau in self._thresholds(rates)]
            for n in range(1, self.max_n + 1):
                tokens_n = [v[n] if n < len(v) else v[-1] for v in values]
                everyone = sum(tokens_n)
                for g in groups:
                    if not g.active:
                        continue
                    key = (g.active, min(n, g.top))
                    if key not in draft:
                        draft[key] = self.cost.draft(drafter, *key)
                    total = b + width * g.drafted[n]
                    if total not in verify:
                        verify[total] = self.cost.verify(b, total / b)
                    seconds = draft[key] + verify[total]
                    if g.everyone:
                        tokens = everyone
                    elif goodput(everyone, seconds) <= best_score:
                        # Rounding is monotone and a left-out sample's 1.0 is no more than its
                        # value, so the masked sum cannot exceed `everyone`: not better, skip it.
                        continue
                    else:
                        tokens = sum([t if m else 1.0 for t, m in zip(tokens_n, g.mask)])
                    score = goodput(tokens, seconds)
                    if score > best_score:
                        best, best_score = Decision(drafter, [min(n, c) if m else 0 for c, m in zip(caps, g.mask)]), score
        return best

    def _thresholds(self, rates: list[float]) -> list[float]:
        """0 (everyone drafts), then up to max_thresholds of the distinct rates above the lowest."""
        thresholds = [0.0]
        if self.per_sample and len(rates) > 1:
            distinct = sorted(set(rates))
            step = max(1, len(distinct) // self.max_thresholds)
            thresholds += distinct[1::step][: self.max_thresholds]
        return thresholds


class _Group:
    """The samples a threshold lets draft: mask, how many can draft at all (active), the largest
    cap among them (top), and drafted[n] = sum over them of min(n, cap), for n = 0..max_n."""

    __slots__ = ("mask", "everyone", "active", "top", "drafted")

    def __init__(self, rates: list[float], caps: list[int], tau: float, max_n: int):
        self.mask = [r >= tau for r in rates]
        self.everyone = all(self.mask)
        reaching = [0] * (max_n + 2)  # reaching[j]: members whose cap is exactly j
        for cap, m in zip(caps, self.mask):
            if m:
                reaching[cap] += 1
        self.active = sum(reaching[1:])
        self.top = max((j for j in range(max_n + 1) if reaching[j]), default=0)
        self.drafted = [0] * (max_n + 1)
        at_least = self.active  # members with cap >= n
        for n in range(1, max_n + 1):
            self.drafted[n] = self.drafted[n - 1] + at_least
            at_least -= reaching[n]


class AdaptiveStrategy(Strategy):
    """The selector, fed by an acceptance estimator and a cost model that both learn from every step."""

    def __init__(self, cost: CostModel, acceptance: AcceptanceEstimator | None = None, max_n: int = 8, per_sample: bool = True):
        self.acceptance = acceptance or AcceptanceEstimator()
        self.cost = cost
        self.selector = Selector(cost, self.acceptance, max_n=max_n, per_sample=per_sample)

    def decide(self, workload: Workload) -> Decision:
        return self.selector.choose(workload)

    def export(self, sample_id: int) -> dict:
        """The sample's own acceptance counts per drafter."""
        return self.acceptance.export(sample_id)

    def adopt(self, sample_id: int, state: dict) -> None:
        self.acceptance.adopt(sample_id, state)

    def forget(self, sample_id: int) -> None:
        self.acceptance.forget(sample_id)

    def state_dict(self) -> dict:
        """Drafter-level acceptance counts and the cost model's online corrections."""
        return {"acceptance": self.acceptance.state_dict(), "cost": self.cost.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.acceptance.load_state_dict(state.get("acceptance", {}))
        self.cost.load_state_dict(state.get("cost", {}))

    def observe(self, record: StepRecord) -> None:
        if record.drafter is None:
            self.cost.observe("verify", record.batch, 1.0, record.verify_s)
            return
        # Accept counts against the lengths asked for: positions a drafter could not fill count as
        # rejections, so an n-gram drafter's estimate includes how often it finds a match.
        self.acceptance.update(record.drafter, record.sample_ids, record.n, record.accepted)
        self.cost.observe("verify", record.batch, record.tokens_per_row, record.verify_s)
        active = sum(1 for n in record.n if n)
        if active:
            self.cost.observe(record.drafter, active, max(record.n), record.draft_s)


class ThresholdStrategy(Strategy):
    """The rule of thumb: speculate with a fixed (drafter, n) only while the live batch is small."""

    def __init__(self, drafter: str, n: int, max_batch: int = 32):
        self.drafter, self.n, self.max_batch = drafter, n, max_batch

    def decide(self, workload: Workload) -> Decision:
        if workload.batch > self.max_batch:
            return Decision(None, [0] * workload.batch)
        return Decision(self.drafter, [self.n] * workload.batch)
