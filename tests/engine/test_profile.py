"""The selector's profile of forward times: what it measures however little time it is given."""

from rlhfspec.engine.profile import forward_times


def test_the_always_lengths_are_measured_at_every_batch_size_whatever_the_budget(policy):
    starved = forward_times(policy, batches=(1, 2, 4), qs=(1, 3, 5), context=8, budget_s=0.0, always=(1, 3))
    assert set(starved) == {(b, q) for b in (1, 2, 4) for q in (1, 3)}
    assert all(t > 0 for t in starved.values())
    full = forward_times(policy, batches=(1, 2, 4), qs=(1, 3, 5), context=8, budget_s=60.0, always=(1, 3))
    assert set(full) == {(b, q) for b in (1, 2, 4) for q in (1, 3, 5)}
    # Without them the grid stops at the first batch once the budget is spent.
    assert set(forward_times(policy, batches=(1, 2, 4), qs=(1, 3, 5), context=8, budget_s=0.0)) == {(1, 1)}
