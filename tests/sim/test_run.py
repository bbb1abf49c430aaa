"""The simulator drives the real selector, coordinator and rebalancer, deterministically, losing nothing."""

import pytest

from rlhfspec.engine.spec import Adaptive, Static
from rlhfspec.rollout.rebalance import Rebalancer
from rlhfspec.sim import simulate
from rlhfspec.sim.workload import lengths
from rlhfspec.strategy.selector import AdaptiveStrategy
from rlhfspec.sim import Workload
from tests.sim.helpers import cluster, table_cost, workload

EXPENSIVE = dict(f=lambda b, q: 0.01 * b * q)  # verifying q tokens costs q plain steps: speculation never pays
CHEAP = dict(f=lambda b, q: 0.01)  # verification is free: speculation always pays


def summary(run):
    return (run.makespan_s, run.tokens, run.steps, run.speculative_steps, run.accepted, run.moves, run.busy_s)


def test_same_inputs_same_rollout():
    work = workload(lengths("lognormal:40,0.8,200", 48, seed=3))
    runs = [simulate(table_cost(lambda b, q: 0.01 + 0.002 * b * q), work, cluster(3, 8), Adaptive(), True, seed=1) for _ in range(2)]
    assert summary(runs[0]) == summary(runs[1])
    assert runs[0].timeline.points == runs[1].timeline.points


def test_calls_the_real_selector_at_every_step_with_the_live_workload(monkeypatch):
    seen = []
    decide = AdaptiveStrategy.decide

    def spy(self, w):
        seen.append((w.batch, list(w.remaining), list(w.drafters)))
        return decide(self, w)

    monkeypatch.setattr(AdaptiveStrategy, "decide", spy)
    work = workload([5, 9, 30, 30], cap=40)
    run = simulate(table_cost(**CHEAP), work, cluster(1, 4), Adaptive())
    assert len(seen) == run.steps
    assert seen[0][0] == 4 and seen[0][2] == ["draft"]
    assert all(max(r) <= 40 - 1 for _, r, _ in seen)  # remaining is what max_new_tokens allows, not the hidden length


def test_selector_decodes_plainly_where_speculation_is_expensive_and_drafts_where_cheap():
    work = workload([60] * 16)
    expensive = simulate(table_cost(**EXPENSIVE), work, cluster(1, 16), Adaptive())
    cheap = simulate(table_cost(**CHEAP), work, cluster(1, 16), Adaptive())
    assert expensive.speculative_steps == 0
    assert cheap.speculative_steps == cheap.steps
    assert cheap.makespan_s < expensive.makespan_s


def test_static_speculation_follows_the_acceptance_profile():
    work = workload([200] * 8, acceptance="draft=1.0")
    run = simulate(table_cost(**CHEAP), work, cluster(1, 8), Static("draft", 4))
    assert run.accepted == run.proposed
    assert run.steps == 40  # 1 prefill token, then 5 tokens per step: ceil(199 / 5)
    never = simulate(table_cost(**CHEAP), workload([50] * 8, acceptance="draft=0.0"), cluster(1, 8), Static("draft", 4))
    assert never.accepted == 0 and never.steps == 49


def test_reallocation_moves_samples_when_instances_are_imbalanced(monkeypatch):
    plans = []
    plan = Rebalancer.plan

    def spy(self, loads):
        plans.append(loads)
        return plan(self, loads)

    monkeypatch.setattr(Rebalancer, "plan", spy)
    cost = table_cost(lambda b, q: 0.01 * b * q)  # a step's time grows with the batch, so balance pays
    work = workload(lengths("lognormal:40,1.0,200", 64, seed=3))
    off = simulate(cost, work, cluster(2, 16), None, realloc=False)
    assert not plans and off.moves == 0
    on = simulate(cost, work, cluster(2, 16), None, realloc=True)
    assert plans and on.moves > 0
    assert on.makespan_s < off.makespan_s
    assert on.tokens == off.tokens == sum(work.lengths)
    # Every move went from the instance the rebalancer saw as busier to one with a free slot.
    for t, move in on.timeline.moves:
        assert move.source != move.destination and move.gain_s > 0


@pytest.mark.parametrize("migration", ["kv", "recompute"])
@pytest.mark.parametrize("strategy", [None, Static("draft", 3), Adaptive(4)])
def test_every_sample_completes_with_its_length(migration, strategy):
    work = workload(lengths("lognormal:30,1.0,150", 40, seed=5), acceptance="draft=0.9,0.6")
    run = simulate(table_cost(lambda b, q: 0.001 * b * q), work, cluster(3, 6, migration=migration), strategy, realloc=True)
    assert run.tokens == sum(work.target(i) for i in range(40))


def test_one_instance_utilisation_is_one_while_samples_are_live():
    run = simulate(table_cost(lambda b, q: 0.01), workload([20] * 4), cluster(1, 4), None)
    assert run.utilisation == [pytest.approx(1.0)]
    assert run.makespan_s == pytest.approx(0.01 + 19 * 0.01)  # one packed prefill, then 19 steps


def test_samples_of_one_prompt_admitted_together_share_its_prefill():
    cost = table_cost(lambda b, q: 0.01)
    cost.prefill_seconds_per_token = 1e-3
    alone = workload([20] * 8)  # 16-token prompts, each sample its own
    grouped = Workload(alone.prompt_lens, alone.lengths, alone.max_new_tokens, alone.acceptance, prompt_ids=[0] * 4 + [1] * 4)
    runs = [simulate(cost, w, cluster(1, 8), None) for w in (alone, grouped)]
    assert runs[0].makespan_s - runs[1].makespan_s == pytest.approx(6 * 16 * 1e-3)  # two prompts prefilled, not eight
    assert runs[0].tokens == runs[1].tokens
