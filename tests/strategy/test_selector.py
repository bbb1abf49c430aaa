"""The selector and the strategies, on hand-written workloads (no tensors)."""

import json
import random

from rlhfspec.strategy.acceptance import AcceptanceEstimator
from rlhfspec.strategy.base import Decision, StepRecord, Workload
from rlhfspec.strategy.cost_model import CostModel
from rlhfspec.strategy.selector import AdaptiveStrategy, Selector, ThresholdStrategy, goodput
from tests.strategy.helpers import estimator, table, workload


def reference_choose(sel: Selector, workload: Workload) -> Decision:
    """Selector.choose as first written: every candidate scored from scratch by evaluate()."""
    b = workload.batch
    best, best_score = Decision(None, [0] * b), goodput(*sel.evaluate(workload, None, [0] * b))
    caps = [max(0, r - 1) for r in workload.remaining]
    for drafter in workload.drafters:
        rates = [sel.acceptance.rate(drafter, sid) for sid in workload.sample_ids]
        thresholds = [0.0]
        if sel.per_sample and b > 1:
            distinct = sorted(set(rates))
            step = max(1, len(distinct) // sel.max_thresholds)
            thresholds += distinct[1::step][: sel.max_thresholds]
        for n in range(1, sel.max_n + 1):
            for tau in thresholds:
                ns = [min(n, cap) if rate >= tau else 0 for rate, cap in zip(rates, caps)]
                if not any(ns):
                    continue
                score = goodput(*sel.evaluate(workload, drafter, ns))
                if score > best_score:
                    best, best_score = Decision(drafter, ns), score
    return best


def random_case(rng: random.Random, permuted_twins: bool = False) -> tuple[Selector, Workload]:
    """A random cost model, estimator state and workload, some built for exact ties, where only the
    order candidates are visited in decides: `flat` costs with near-zero rates (a longer draft or
    one more sample adds exactly nothing), and `twins`, drafters with equal costs that saw the same
    steps, possibly dealt to the samples in another order (equal sums of the same terms, so only
    summing in the reference's order reproduces which one it picks)."""
    drafters = rng.sample(["draft", "ngram", "eagle"], rng.randint(2 if permuted_twins else 1, 3))
    batches = sorted(rng.sample([1, 2, 4, 8, 16, 32, 64], rng.randint(1, 5)))
    flat, twins = rng.random() < 0.3, permuted_twins or rng.random() < 0.4
    if flat:
        verify = {(b, q): 0.03 for b in batches for q in (1, 9)}
        drafts = {d: {(b, n): 0.0 for b in batches for n in (1, 8)} for d in drafters}
    else:
        base, slope = rng.uniform(0.005, 0.05), rng.uniform(0.0, 0.004)
        verify = {(b, q): base + slope * b * q * rng.uniform(0.9, 1.1) for b in batches for q in rng.sample([1, 3, 5, 9], rng.randint(1, 4))}
        drafts = {d: {(b, n): rng.uniform(0.0, 0.002) * n * (1 + b / 16) for b in batches for n in (1, 4, 8)} for d in drafters}
        drafts = {d: t for d, t in drafts.items() if rng.random() < 0.7}
        if twins:
            drafts = {d: drafts[drafters[0]] for d in drafters} if drafters[0] in drafts else {}
    cost = CostModel(verify, drafts)
    for _ in range(0 if flat else rng.randint(0, 4)):
        kind = "verify" if twins else rng.choice(["verify", *drafters])
        cost.observe(kind, rng.randint(1, 64), rng.randint(1, 8), rng.uniform(0.001, 0.1))
    if flat:
        prior, strength = rng.choice([0.0, 1e-9, 0.3]), rng.choice([1e-18, 1e-18, 1.0, 8.0])
    else:
        prior, strength = rng.uniform(0.1, 0.9), rng.choice([1.0, 4.0, 8.0])
    est = AcceptanceEstimator(prior=prior, prior_strength=strength, decay=1.0 if twins else rng.choice([1.0, 0.99]))
    b = rng.choice([3, 5, 8, 16, 33, 64] if permuted_twins else [1, 1, 2, 3, 5, 8, 16, 33, 64])
    sample_ids = rng.sample(range(200), b)
    remaining = [rng.choice([1, 2, 3, 5, 9, 100]) for _ in range(b)]
    dealt = {s: s for s in sample_ids}
    if permuted_twins or (twins and rng.random() < 0.5):
        dealt = dict(zip(sample_ids, rng.sample(sample_ids, b)))
        remaining = [remaining[0]] * b  # so that the twins' terms are the same ones, permuted
    for _ in range(rng.randint(0, 30)):
        seen = [s for s in sample_ids if rng.random() < 0.6]
        quality = {s: 0.0 if flat and s % 2 else (s * 7919 % 100) / 100 for s in seen}
        proposed = [rng.randint(0, 6) for _ in seen]
        accepted = [sum(1 for _ in range(p) if rng.random() < quality[s]) for s, p in zip(seen, proposed)]
        if twins:
            est.update(drafters[0], seen, proposed, accepted)
            for drafter in drafters[1:]:
                est.update(drafter, [dealt[s] for s in seen], proposed, accepted)
        else:
            est.update(rng.choice(drafters), seen, proposed, accepted)
    sel = Selector(cost, est, max_n=rng.randint(1, 8), per_sample=permuted_twins or rng.random() < 0.8, max_thresholds=rng.randint(1, 4))
    # Some drafters draft trees of 2 or 3 chains (twins share one width, so their costs stay equal).
    width = rng.choice([1, 1, 2, 3])
    branches = {d: width if twins else rng.choice([1, 1, 2, 3]) for d in drafters}
    return sel, Workload(sample_ids, [50] * b, remaining, drafters, branches)


def test_choose_equals_the_reference_selector_exactly():
    rng = random.Random(0)
    drafted = 0
    for _ in range(600):
        sel, work = random_case(rng)
        decision = sel.choose(work)
        assert decision == reference_choose(sel, work)
        drafted += decision.drafter is not None
    assert 60 < drafted < 540  # the cases exercise both outcomes
    for _ in range(300):
        sel, work = random_case(rng, permuted_twins=True)
        assert sel.choose(work) == reference_choose(sel, work)


def test_a_tree_is_priced_at_all_the_tokens_it_verifies():
    cost = CostModel(table(lambda b, q: 0.01 + 0.001 * b * q), {"draft": table(lambda b, n: 0.0)})
    sel = Selector(cost, estimator(0.7))
    chain = Workload([0, 1], [50, 50], [100, 100], ["draft"])
    tree = Workload([0, 1], [50, 50], [100, 100], ["draft"], {"draft": 3})
    drafting = cost.draft("draft", 2, 2)
    assert sel.evaluate(chain, "draft", [2, 2])[1] == drafting + cost.verify(2, 3.0)
    assert sel.evaluate(tree, "draft", [2, 2])[1] == drafting + cost.verify(2, 7.0)
    # Same acceptance, three times the verified drafts: a tree drafts shorter than the chain.
    assert max(sel.choose(tree).n) < max(sel.choose(chain).n)


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


def test_the_better_drafter_is_chosen():
    cost = CostModel(table(lambda b, q: 0.04 + 0.0005 * b * q), {"draft": table(lambda b, n: 0.001 * n)})
    est = AcceptanceEstimator(decay=1.0)
    for _ in range(50):
        est.update("draft", [0, 1], [4, 4], [4, 4])
        est.update("ngram", [0, 1], [4, 4], [0, 1])
    assert Selector(cost, est).choose(workload(2, drafters=("ngram", "draft"))).drafter == "draft"


def test_an_empty_workload_decodes_plainly():
    cost = CostModel(table(lambda b, q: 0.01))
    assert Selector(cost, AcceptanceEstimator()).choose(Workload([], [], [], ["draft"])) == Decision(None, [])


def test_adaptive_strategy_learns_from_step_records():
    cost = CostModel(table(lambda b, q: 0.04 + 0.0005 * b * q), {"draft": table(lambda b, n: 0.001 * n)})
    strat = AdaptiveStrategy(cost)
    for _ in range(50):
        strat.observe(StepRecord(2, "draft", [4, 4], [4, 4], [0, 0], 2, 0.004, 0.05, 30, [0, 1]))
    assert strat.acceptance.rate("draft") < 0.1
    assert strat.decide(workload(2)).drafter is None


def test_speculation_measured_dearer_than_a_flat_profile_said_goes_back_to_plain_decoding():
    """The profile says verifying two tokens a row at batch 64 costs what a plain step does (a
    profile that never reached batch 64); the steps measure 2.5x. Half the drafts are accepted
    (1.5 tokens a row for 2.5x the time): plain decoding wins once the steps are seen."""
    strat = AdaptiveStrategy(CostModel(table(lambda b, q: 0.1), {"draft": table(lambda b, n: 0.0)}))
    ids = list(range(64))
    assert strat.decide(workload(64)).drafter == "draft"
    for _ in range(20):
        strat.observe(StepRecord(64, "draft", [1] * 64, [1] * 64, [1, 0] * 32, 96, 0.0, 0.25, 100, ids))
    assert 0.4 < strat.acceptance.rate("draft") < 0.6
    assert strat.decide(workload(64)).drafter is None


def test_decision_time_counts_in_the_step_but_not_in_the_cost_model():
    record = StepRecord(2, "draft", [4, 4], [4, 4], [1, 2], 5, 0.004, 0.05, 30, [0, 1], 1.5)
    assert record.decide_s == 0.0 and record.start_s == 1.5
    slow = StepRecord(2, "draft", [4, 4], [4, 4], [1, 2], 5, 0.004, 0.05, 30, [0, 1], 1.5, decide_s=0.5)
    assert slow.seconds == 0.5 + 0.004 + 0.05
    learned = []
    for r in (record, slow):
        strat = AdaptiveStrategy(CostModel(table(lambda b, q: 0.01 * q), {"draft": table(lambda b, n: 0.001 * n)}))
        strat.observe(r)
        learned.append((strat.cost.verify(2, 3), strat.cost.draft("draft", 2, 4)))
    assert learned[0] == learned[1]


def test_a_migrated_sample_keeps_its_estimate_and_finished_ones_are_dropped():
    def strategy():
        return AdaptiveStrategy(CostModel(table(lambda b, q: 0.02 + 0.001 * b * q), {"draft": table(lambda b, n: 0.001 * n)}))

    src, dst = strategy(), strategy()
    for _ in range(20):  # sample 5 is always right, sample 6 never
        src.observe(StepRecord(2, "draft", [4, 4], [4, 4], [4, 0], 6, 0.004, 0.03, 30, [5, 6]))
    state = json.loads(json.dumps(src.export(5)))
    src.forget(5)
    assert src.export(5) == {} and src.acceptance.rate("draft", 5) == src.acceptance.rate("draft")
    dst.adopt(5, state)
    assert dst.acceptance.rate("draft", 5) > dst.acceptance.rate("draft")
    assert dst.decide(Workload([5, 9], [30, 30], [100, 100], ["draft"])).n[0] > 0
    dst.forget(5)
    assert dst.acceptance.rate("draft", 5) == dst.acceptance.rate("draft")


def test_state_dict_resumes_the_same_decisions_without_per_sample_state():
    def strategy():
        return AdaptiveStrategy(CostModel(table(lambda b, q: 0.02 + 0.001 * b * q), {"draft": table(lambda b, n: 0.001 * n)}))

    old = strategy()
    for _ in range(30):
        old.observe(StepRecord(4, "draft", [3] * 4, [3] * 4, [3, 2, 0, 1], 10, 0.003, 0.045, 30, [0, 1, 2, 3]))
        old.observe(StepRecord(4, None, [0] * 4, [0] * 4, [0] * 4, 4, 0.0, 0.05, 30, [0, 1, 2, 3]))
    new = strategy()
    new.load_state_dict(json.loads(json.dumps(old.state_dict())))
    for sid in (0, 1, 2, 3):
        old.forget(sid)
    for b in (1, 4, 16):
        assert new.decide(workload(b)) == old.decide(workload(b))
    assert new.acceptance.samples == {}
    assert strategy().decide(workload(4)) != old.decide(workload(4))  # the state did change decisions


def test_threshold_rule_switches_off_speculation_for_large_batches():
    rule = ThresholdStrategy("ngram", 3, max_batch=32)
    assert rule.decide(workload(64)).drafter is None
    assert rule.decide(workload(8)).n == [3] * 8
