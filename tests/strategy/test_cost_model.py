"""The cost model: interpolation, online refit, persistence, and the coordinator's step table."""

import bisect
import json
import math
import random

import pytest

from rlhfspec.strategy.cost_model import CostModel, interpolate, step_table
from tests.strategy.helpers import table


def reference_lookup(table, batch, k):
    """The cost model's interpolation as first written: every axis sorted on every call."""
    def interp(xs, ys, x):
        if len(xs) == 1:
            return ys[0]
        i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    batches = sorted({b for b, _ in table})
    per_batch = []
    for b in batches:
        ks = sorted(kk for bb, kk in table if bb == b)
        per_batch.append(interp([float(x) for x in ks], [table[(b, x)] for x in ks], k))
    return max(interp([math.log2(b) for b in batches], per_batch, math.log2(max(batch, 1))), 1e-6)


def reference_step_table(measured, capacity):
    """The rollout coordinator's own step table, which step_table replaces."""
    capacity = max(capacity, 1)
    if not measured:
        return [0.0] + [1.0] * capacity
    known = sorted(measured.items())
    out = [0.0]
    for b in range(1, capacity + 1):
        lower = [x for x in known if x[0] <= b]
        upper = [x for x in known if x[0] >= b]
        if lower and upper:
            (b0, t0), (b1, t1) = lower[-1], upper[0]
            out.append(t0 if b1 == b0 else t0 + (t1 - t0) * (b - b0) / (b1 - b0))
        else:
            out.append((lower or upper)[-1 if lower else 0][1])
    return out


def test_interpolate_is_linear_inside_and_extrapolates_the_end_segments():
    xs, ys = [1.0, 2.0, 4.0], [10.0, 20.0, 30.0]
    assert interpolate(xs, ys, 1.5) == 15.0
    assert interpolate(xs, ys, 3.0) == 25.0
    assert interpolate(xs, ys, 0.0) == 0.0 and interpolate(xs, ys, 6.0) == 40.0
    assert interpolate([3.0], [7.0], 100.0) == 7.0


def test_step_table_matches_the_coordinators_table_exactly():
    assert step_table({}, 3) == [0.0, 1.0, 1.0, 1.0]
    assert step_table({2: 0.5}, 0) == [0.0, 0.5]
    assert step_table({2: 0.2, 4: 0.4}, 6) == pytest.approx([0.0, 0.2, 0.2, 0.3, 0.4, 0.4, 0.4])
    rng = random.Random(1)
    for _ in range(300):
        measured = {b: rng.uniform(0.01, 1.0) for b in rng.sample(range(1, 40), rng.randint(1, 6))}
        capacity = rng.randint(0, 48)
        assert step_table(measured, capacity) == reference_step_table(measured, capacity)


def test_predictions_equal_the_interpolation_of_the_table_exactly():
    rng = random.Random(2)
    for _ in range(100):
        batches = sorted(rng.sample([1, 2, 3, 4, 8, 16, 24, 32, 64, 128], rng.randint(1, 6)))
        verify = {(b, q): rng.uniform(0.001, 0.2) for b in batches for q in rng.sample([1, 2, 3, 5, 9, 17], rng.randint(1, 4))}
        drafts = {(b, n): rng.uniform(0.0, 0.05) for b in batches for n in (1, 8)}
        cost = CostModel(verify, {"d": drafts})
        for _ in range(20):
            b, q, n = rng.randint(1, 200), rng.uniform(0.5, 12.0), rng.randint(1, 9)
            assert cost.verify(b, q) == reference_lookup(verify, b, q)
            assert cost.draft("d", b, n) == reference_lookup(drafts, b, n)


def test_the_cost_model_refits_when_timings_change():
    cost = CostModel(table(lambda b, q: 0.01 * q))
    assert cost.verify(4, 3) == pytest.approx(0.03)
    for _ in range(30):
        cost.observe("verify", 4, 1, 0.02)
    assert cost.verify(4, 1) == pytest.approx(0.02, rel=0.02)
    assert cost.verify(4, 5) == pytest.approx(0.10, rel=0.05)  # a plain step's correction carries to other lengths
    assert cost.verify(40, 3) == pytest.approx(0.06, rel=0.05)  # and to other batches until they are measured
    for _ in range(30):
        cost.observe("verify", 4, 3, 0.09)
    assert cost.verify(4, 3) == pytest.approx(0.09, rel=0.02)
    assert cost.verify(4, 1) == pytest.approx(0.02, rel=0.02)


def test_smoothing_zero_keeps_the_profiled_prices():
    cost = CostModel(table(lambda b, q: 0.01 * q), smoothing=0)
    for q in (1, 3):
        cost.observe("verify", 4, q, 0.5)
    assert cost.verify(4, 1) == pytest.approx(0.01) and cost.verify(4, 3) == pytest.approx(0.03)
    cost.observe("fresh", 4, 2, 0.08)  # a drafter with no profile is still priced from its first step
    assert "fresh" in cost.learned and cost.correction == {}


def test_speculative_steps_dearer_than_profiled_correct_their_own_price_not_plain_steps():
    """A profile flat in q at a large batch (verification looks free) and a machine where three
    tokens a row cost 2.5x a plain step: the measured steps price speculation right, and plain
    steps, never measured, keep the profile's price, so the selector can go back to them."""
    cost = CostModel(table(lambda b, q: 0.1))
    for _ in range(30):
        cost.observe("verify", 64, 2.2, 0.25)
    assert cost.verify(64, 2.2) == pytest.approx(0.25, rel=0.02)
    assert cost.verify(64, 1) == pytest.approx(0.1)
    for _ in range(30):
        cost.observe("verify", 64, 1, 0.12)
    assert cost.verify(64, 1) == pytest.approx(0.12, rel=0.02) and cost.verify(64, 2.2) == pytest.approx(0.25, rel=0.02)


def test_corrections_saved_before_they_were_kept_per_length_still_load():
    cost = CostModel(table(lambda b, q: 0.01 * q))
    cost.load_state_dict({"correction": [["verify", 8, 1.5], ["verify", 0, 2.0]]})
    assert cost.verify(8, 3) == pytest.approx(0.045) and cost.verify(64, 1) == pytest.approx(0.02)


def test_an_unprofiled_drafter_is_priced_from_its_first_step():
    cost = CostModel(table(lambda b, q: 0.01 * q))
    assert cost.draft("ngram", 4, 2) == pytest.approx(2e-5 * 8)  # the default guess
    cost.observe("ngram", 4, 2, 0.008)  # 1 ms per row and token
    assert cost.draft("ngram", 1, 1) == pytest.approx(0.001)
    assert cost.draft("ngram", 64, 1) == pytest.approx(0.064)
    assert cost.draft("ngram", 4, 0) == 0.0


def test_cost_model_round_trips_through_json(tmp_path):
    cost = CostModel(table(lambda b, q: 0.001 * b + q * 0.01), {"draft": table(lambda b, n: 0.003 * n)})
    cost.save(tmp_path / "p.json")
    again = CostModel.load(tmp_path / "p.json")
    assert again.verify(7, 2.5) == pytest.approx(cost.verify(7, 2.5))
    assert again.draft("draft", 3, 4) == pytest.approx(cost.draft("draft", 3, 4))


def test_state_dict_carries_what_was_learned_online():
    def fresh():
        return CostModel(table(lambda b, q: 0.01 * q), {"draft": table(lambda b, n: 0.001 * n)})

    cost = fresh()
    for _ in range(5):
        cost.observe("verify", 8, 2, 0.05)
        cost.observe("draft", 3, 4, 0.02)
        cost.observe("ngram", 8, 3, 0.003)
    again = fresh()
    again.load_state_dict(json.loads(json.dumps(cost.state_dict())))
    for b in (1, 3, 8, 40):
        assert again.verify(b, 2.5) == cost.verify(b, 2.5)
        assert again.draft("draft", b, 4) == cost.draft("draft", b, 4)
        assert again.draft("ngram", b, 4) == cost.draft("ngram", b, 4)
    assert again.verify(8, 2) != fresh().verify(8, 2)
