"""The rebalancer alone, on hand-written loads."""

import pytest

from rlhfspec.rollout.rebalance import InstanceLoad, LengthPredictor, Rebalancer, SampleLoad, finish_time, migration_cost


def flat(seconds=0.1, capacity=8):
    """A step costs more with more live samples (compute grows with the batch)."""
    return [0.0] + [seconds + 0.05 * b for b in range(1, capacity + 1)]


def load(i, remaining, free=4, **kw):
    return InstanceLoad(i, [SampleLoad(100 * i + k, 50, r) for k, r in enumerate(remaining)], free, flat(), **kw)


def test_nothing_to_gain_when_steps_cost_the_same_at_any_batch():
    constant = [0.0] + [0.1] * 8
    loads = [InstanceLoad(0, [SampleLoad(0, 50, 200), SampleLoad(1, 50, 180)], 4, constant), InstanceLoad(1, [], 4, constant)]
    assert Rebalancer().plan(loads) == []  # the longest sample sets the makespan wherever it runs


def test_finish_time_sums_steps_as_the_batch_shrinks():
    table = [0.0, 1.0, 1.5, 2.0]
    # three samples with 1, 2 and 4 steps left: 1 step at batch 3, 1 at batch 2, 2 at batch 1
    assert finish_time(table, [4, 1, 2]) == pytest.approx(2.0 + 1.5 + 2 * 1.0)


def test_moves_a_long_sample_from_the_busy_to_the_idle_instance():
    moves = Rebalancer().plan([load(0, [200, 180, 5]), load(1, [])])
    assert moves and moves[0].source == 0 and moves[0].destination == 1
    assert moves[0].sample_id in (0, 1) and moves[0].gain_s > 0


def test_no_move_when_the_gain_does_not_pay_for_the_migration():
    costly = dict(prefill_seconds_per_token=1.0, kv_bytes_per_token=1e9, link_bytes_per_second=1.0)
    assert Rebalancer().plan([load(0, [30, 28], **costly), load(1, [], **costly)]) == []


def test_no_move_between_balanced_instances():
    assert Rebalancer().plan([load(0, [100, 90]), load(1, [95, 100])]) == []


def test_respects_destination_capacity():
    moves = Rebalancer(max_moves=8).plan([load(0, [300, 290, 280, 270]), load(1, [], free=1)])
    assert len(moves) == 1


def test_no_ping_pong():
    rebalancer = Rebalancer()
    first = rebalancer.plan([load(0, [200, 190]), load(1, [])])
    moved = first[0].sample_id
    # The same sample now makes instance 1 the laggard: it must not go back.
    back = rebalancer.plan([InstanceLoad(0, [SampleLoad(1, 50, 10)], 4, flat()), InstanceLoad(1, [SampleLoad(moved, 50, 400)], 4, flat())])
    assert all(m.sample_id != moved for m in back)


def test_kv_or_recompute_whichever_is_cheaper():
    s = SampleLoad(1, 1000, 10)
    fast_link = InstanceLoad(0, [s], 1, flat(), kv_bytes_per_token=1e4, link_bytes_per_second=1e10, prefill_seconds_per_token=1e-3)
    slow_link = InstanceLoad(0, [s], 1, flat(), kv_bytes_per_token=1e4, link_bytes_per_second=1e6, prefill_seconds_per_token=1e-3)
    assert migration_cost(s, fast_link, fast_link)[1] is True
    assert migration_cost(s, slow_link, slow_link)[1] is False


def test_length_predictor_uses_finished_lengths():
    p = LengthPredictor(max_new_tokens=200)
    assert p.remaining(10) == 95  # no evidence yet: half of what is left
    for n in (20, 40, 60, 100, 150):
        p.observe(n)
    assert p.remaining(50) == pytest.approx((60 + 100 + 150) / 3 - 50)
    assert p.remaining(190) == 5  # longer than anything finished: half of the 10 tokens it may still emit
