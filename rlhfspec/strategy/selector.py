"""Choose the drafter and draft lengths that maximise expected tokens per second for the next step."""

from __future__ import annotations

from rlhfspec.strategy.acceptance import AcceptanceEstimator
from rlhfspec.strategy.base import Decision, StepRecord, Strategy, Workload
from rlhfspec.strategy.cost_model import CostModel


def goodput(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


class Selector:
    """argmax over (drafter, n, threshold) of sum_s E[tokens_s | n_s] / (t_draft + t_verify).

    n = 0 (plain decoding) is always a candidate. Per-sample draft lengths: for each (drafter, n)
    the samples whose estimated acceptance is below a threshold draft nothing, and the thresholds
    tried are the distinct estimated rates, so a step can speculate only for the samples it pays
    for. Verification cost is priced at the mean number of tokens per row.
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
        return tokens, drafting + self.cost.verify(b, sum(n + 1 for n in ns) / b)

    def choose(self, workload: Workload) -> Decision:
        b = workload.batch
        best, best_score = Decision(None, [0] * b), goodput(*self.evaluate(workload, None, [0] * b))
        caps = [max(0, r - 1) for r in workload.remaining]
        for drafter in workload.drafters:
            rates = [self.acceptance.rate(drafter, sid) for sid in workload.sample_ids]
            thresholds = [0.0]
            if self.per_sample and b > 1:
                distinct = sorted(set(rates))
                step = max(1, len(distinct) // self.max_thresholds)
                thresholds += distinct[1::step][: self.max_thresholds]
            for n in range(1, self.max_n + 1):
                for tau in thresholds:
                    ns = [min(n, cap) if rate >= tau else 0 for rate, cap in zip(rates, caps)]
                    if not any(ns):
                        continue
                    score = goodput(*self.evaluate(workload, drafter, ns))
                    if score > best_score:
                        best, best_score = Decision(drafter, ns), score
        return best


class AdaptiveStrategy(Strategy):
    """The selector, fed by an acceptance estimator and a cost model that both learn from every step."""

    def __init__(self, cost: CostModel, acceptance: AcceptanceEstimator | None = None, max_n: int = 8, per_sample: bool = True):
        self.acceptance = acceptance or AcceptanceEstimator()
        self.cost = cost
        self.selector = Selector(cost, self.acceptance, max_n=max_n, per_sample=per_sample)

    def decide(self, workload: Workload) -> Decision:
        return self.selector.choose(workload)

    def sample_state(self, sample_id: int) -> dict:
        return self.acceptance.sample_state(sample_id)

    def restore_sample(self, sample_id: int, state: dict) -> None:
        self.acceptance.restore_sample(sample_id, state)

    def observe(self, record: StepRecord) -> None:
        if record.drafter is None:
            self.cost.observe("verify", record.batch, 1.0, record.verify_s)
            return
        # Accept counts against the lengths asked for: positions a drafter could not fill count as
        # rejections, so an n-gram drafter's estimate includes how often it finds a match.
        self.acceptance.update(record.drafter, record.sample_ids, record.n, record.accepted)
        self.cost.observe("verify", record.batch, sum(d + 1 for d in record.drafted) / record.batch, record.verify_s)
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
