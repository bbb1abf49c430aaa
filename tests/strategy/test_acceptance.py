"""Acceptance estimates: the geometric model, shrinkage toward the drafter, per-sample state."""

import json
import random

import pytest

from rlhfspec.strategy.acceptance import AcceptanceEstimator, expected_tokens_upto
from tests.strategy.helpers import estimator


def geometric(alpha: float, n: int) -> float:
    """1 + alpha + ... + alpha^n: tokens of a draft of n accepted i.i.d. with probability alpha (the reference)."""
    return float(n + 1) if alpha >= 1.0 else (1.0 - alpha ** (n + 1)) / (1.0 - alpha)


def test_equal_rates_give_the_geometric_sum():
    for alpha in (0.0, 0.3, 0.75, 0.99, 1.0):
        for n in range(0, 9):
            direct = sum(alpha**j for j in range(n + 1))
            assert expected_tokens_upto([alpha] * n)[n] == pytest.approx(direct) == pytest.approx(geometric(alpha, n))


def test_the_geometric_model_predicts_iid_acceptance():
    est = estimator(0.7)
    assert est.rate("draft") == pytest.approx(0.7, abs=0.03)
    assert est.expected("draft", None, 4) == pytest.approx(geometric(0.7, 4), abs=0.1)
    assert est.expected("draft", 3, 0) == 1.0


def test_acceptance_estimates_per_sample_shrink_toward_the_drafter():
    est = AcceptanceEstimator(prior=0.5, prior_strength=4, decay=1.0)
    est.update("ngram", [1, 2], [4, 4], [4, 0])
    assert est.rate("ngram", 1) > est.rate("ngram") > est.rate("ngram", 2)
    assert est.rate("ngram", 99) == est.rate("ngram")  # an unseen sample starts at the drafter's rate
    est.forget(1)
    assert est.rate("ngram", 1) == est.rate("ngram")
    assert est.rate("ngram", 2) < est.rate("ngram")  # forgetting one sample leaves the others


def test_rates_of_many_samples_equal_one_at_a_time():
    est = AcceptanceEstimator(decay=0.9)
    est.update("a", [0, 1, 2], [4, 4, 2], [1, 4, 0])
    est.update("b", [1, 3], [3, 3], [3, 2])
    for drafter in ("a", "b", "unseen"):
        assert est.rates(drafter, [0, 1, 2, 3, 4]) == [est.rate(drafter, s) for s in (0, 1, 2, 3, 4)]


def test_a_sample_exported_and_adopted_keeps_its_rates_per_drafter():
    src, dst = AcceptanceEstimator(decay=1.0), AcceptanceEstimator(decay=1.0)
    src.update("a", [7, 8], [4, 4], [4, 0])
    src.update("b", [7], [2], [0])
    dst.update("a", [1], [4], [2])
    state = json.loads(json.dumps(src.export(7)))  # it travels as plain JSON
    assert set(state) == {"a", "b"}
    dst.adopt(7, state)
    # Shrunk toward the destination's drafter rate, from the sample's own counts.
    for drafter in ("a", "b"):
        own = src.samples[7][drafter].rate(dst.rate(drafter), dst.strength)
        assert dst.rate(drafter, 7) == own
    assert src.export(99) == {} and dst.export(99) == {}
    dst.forget(7)
    assert dst.export(7) == {} and dst.rate("a", 7) == dst.rate("a")


def test_state_dict_keeps_drafter_counts_and_drops_samples():
    est = AcceptanceEstimator(decay=0.95)
    est.update("a", [0, 1], [4, 4], [3, 1])
    state = json.loads(json.dumps(est.state_dict()))
    again = AcceptanceEstimator(decay=0.95)
    again.load_state_dict(state)
    assert again.rate("a") == est.rate("a")
    assert again.rate("a", 0) == again.rate("a")  # per-sample counts are not persisted


def test_expected_upto_equals_one_call_per_length_exactly():
    est = AcceptanceEstimator(decay=0.97)
    est.update("a", [0, 1, 2], [4, 6, 2], [1, 6, 0])
    est.update("a", [1, 3], [3, 8], [3, 2])
    for sample in (None, 0, 1, 3, 99):
        for n in range(0, 9):
            assert est.expected_upto("a", sample, n) == [est.expected("a", sample, k) for k in range(n + 1)]
        assert est.position_rates_of("a", [sample, 1], 8) == [est.position_rates("a", sample, 8), est.position_rates("a", 1, 8)]
    assert expected_tokens_upto([0.5, 0.5, 0.5]) == [1.0, 1.5, 1.75, 1.875]


def test_acceptance_that_falls_with_the_position_is_priced_per_position():
    # A head whose first draft is accepted 90% of the time and each later one 20%.
    est = AcceptanceEstimator(decay=1.0)
    rng = random.Random(1)
    for _ in range(400):
        accepted = []
        for _ in range(16):
            k = 0
            while k < 4 and rng.random() < (0.9 if k == 0 else 0.2):
                k += 1
            accepted.append(k)
        est.update("eagle", list(range(16)), [4] * 16, accepted)
    a = est.position_rates("eagle", None, 4)
    assert a[0] == pytest.approx(0.9, abs=0.02) and all(x == pytest.approx(0.2, abs=0.03) for x in a[1:])
    assert est.expected("eagle", None, 1) == pytest.approx(1.9, abs=0.03)
    direct = 1 + 0.9 + 0.9 * 0.2 + 0.9 * 0.2**2 + 0.9 * 0.2**3
    assert est.expected("eagle", None, 4) == pytest.approx(direct, abs=0.05)
    # The pooled geometric model (one rate for every position, 0.53 here) underprices a draft of 1.
    assert geometric(est.rate("eagle"), 1) < 1.9 - 0.3
