"""The strategy layer alone, on hand-written workloads (no tensors)."""

import random

import pytest

from rlhfspec.strategy.acceptance import AcceptanceEstimator, expected_tokens
from rlhfspec.strategy.base import StepRecord, Workload
from rlhfspec.strategy.cost_model import CostModel
from rlhfspec.strategy.selector import AdaptiveStrategy, Selector, ThresholdStrategy


def table(f):
    return {(b, q): f(b, q) for b in (1, 2, 4, 8, 16, 32, 64) for q in (1, 3, 5, 9)}


def workload(b, remaining=100, drafters=("draft",)):
    return Workload(list(range(b)), [50] * b, [remaining] * b, list(drafters))


def estimator(rate, drafter="draft", samples=64, steps=200):
    """An estimator that has seen `steps` steps of i.i.d. acceptance at `rate`."""
    est = AcceptanceEstimator(decay=1.0)
    rng = random.Random(0)
    for _ in range(steps):
        accepted = []
        for _ in range(samples):
            k = 0
            while k < 4 and rng.random() < rate:
                k += 1
            accepted.append(k)
        est.update(drafter, list(range(samples)), [4] * samples, accepted)
    return est


def test_expected_tokens_equals_the_direct_sum():
    for alpha in (0.0, 0.3, 0.75, 0.99, 1.0):
        for n in range(0, 9):
            direct = sum(alpha**j for j in range(n + 1))
            assert expected_tokens(alpha, n) == pytest.approx(direct)


def test_plain_decoding_when_verification_is_steep_and_acceptance_low():
    # Compute-bound large batch: a forward costs in proportion to the tokens it carries.
    steep = CostModel(table(lambda b, q: 0.002 * b * q + 0.01), {"draft": table(lambda b, n: 0.002 * n)})
    decision = Selector(steep, estimator(0.2)).choose(workload(64))
    assert decision.drafter is None and not any(decision.n)


def test_long_drafts_when_acceptance_is_high_and_the_batch_small():
    # Memory-bound small batch: extra tokens per row are nearly free.
    flat = CostModel(table(lambda b, q: 0.04 + 0.0005 * b * q), {"draft": table(lambda b, n: 0.001 * n)})
    decision = Selector(flat, estimator(0.9)).choose(workload(1))
    assert decision.drafter == "draft" and decision.n[0] >= 6


def test_the_choice_changes_as_the_batch_shrinks():
    cost = CostModel(table(lambda b, q: 0.03 + 0.0015 * b * q), {"draft": table(lambda b, n: 0.002 * n)})
    sel = Selector(cost, estimator(0.6))
    big, small = sel.choose(workload(64)), sel.choose(workload(2))
    assert max(big.n) < max(small.n)


def test_draft_lengths_never_exceed_what_a_sample_may_still_emit():
    flat = CostModel(table(lambda b, q: 0.04), {"draft": table(lambda b, n: 0.0001 * n)})
    decision = Selector(flat, estimator(0.95)).choose(Workload([0, 1], [10, 10], [3, 1], ["draft"]))
    assert decision.n[0] <= 2 and decision.n[1] == 0


def test_low_acceptance_samples_are_left_out_per_sample():
    cost = CostModel(table(lambda b, q: 0.02 + 0.002 * b * q), {"draft": table(lambda b, n: 0.001 * n)})
    est = AcceptanceEstimator(decay=1.0, prior_strength=2)
    for _ in range(100):  # samples 0-7 accept everything, samples 8-15 nothing
        est.update("draft", list(range(16)), [4] * 16, [4] * 8 + [0] * 8)
    decision = Selector(cost, est).choose(workload(16))
    assert decision.drafter == "draft"
    assert min(decision.n[:8]) > 0 and max(decision.n[8:]) == 0


def test_the_cost_model_refits_when_timings_change():
    cost = CostModel(table(lambda b, q: 0.01 * q))
    assert cost.verify(4, 3) == pytest.approx(0.03)
    for _ in range(30):
        cost.observe("verify", 4, 3, 0.06)
    assert cost.verify(4, 3) == pytest.approx(0.06, rel=0.02)
    assert cost.verify(4, 5) == pytest.approx(0.10, rel=0.05)  # the correction carries to other lengths


def test_cost_model_round_trips_through_json(tmp_path):
    cost = CostModel(table(lambda b, q: 0.001 * b + q * 0.01), {"draft": table(lambda b, n: 0.003 * n)})
    cost.save(tmp_path / "p.json")
    again = CostModel.load(tmp_path / "p.json")
    assert again.verify(7, 2.5) == pytest.approx(cost.verify(7, 2.5))
    assert again.draft("draft", 3, 4) == pytest.approx(cost.draft("draft", 3, 4))


def test_acceptance_estimates_per_sample_shrink_toward_the_drafter():
    est = AcceptanceEstimator(prior=0.5, prior_strength=4, decay=1.0)
    est.update("ngram", [1, 2], [4, 4], [4, 0])
    assert est.rate("ngram", 1) > est.rate("ngram") > est.rate("ngram", 2)
    assert est.rate("ngram", 99) == est.rate("ngram")  # an unseen sample starts at the drafter's rate
    est.forget(1)
    assert est.rate("ngram", 1) == est.rate("ngram")


def test_the_geometric_model_predicts_iid_acceptance():
    est = estimator(0.7)
    assert est.rate("draft") == pytest.approx(0.7, abs=0.03)
    assert est.expected("draft", None, 4) == pytest.approx(expected_tokens(0.7, 4), abs=0.1)
    # Both models' squared error approaches the irreducible variance of tokens per step.
    probs = [0.7**k * 0.3 for k in range(4)] + [0.7**4]
    mean = sum(p * (k + 1) for k, p in enumerate(probs))
    variance = sum(p * (k + 1 - mean) ** 2 for k, p in enumerate(probs))
    errors = est.prediction_error()
    assert errors["geometric"] == pytest.approx(variance, rel=0.15)
    assert errors["empirical"] == pytest.approx(variance, rel=0.15)


def test_adaptive_strategy_learns_from_step_records():
    cost = CostModel(table(lambda b, q: 0.04 + 0.0005 * b * q), {"draft": table(lambda b, n: 0.001 * n)})
    strat = AdaptiveStrategy(cost)
    for _ in range(50):
        strat.observe(StepRecord(2, "draft", [4, 4], [4, 4], [0, 0], 2, 0.004, 0.05, 30, [0, 1]))
    assert strat.acceptance.rate("draft") < 0.1
    assert strat.decide(workload(2)).drafter is None


def test_threshold_rule_switches_off_speculation_for_large_batches():
    rule = ThresholdStrategy("ngram", 3, max_batch=32)
    assert rule.decide(workload(64)).drafter is None
    assert rule.decide(workload(8)).n == [3] * 8
