"""The adaptive strategy inside the engine: lossless, it records every decision, and it drafts
when drafting pays and decodes plainly when it does not."""

import pytest

from rlhfspec import SamplingParams, generate, load_model
from rlhfspec.engine.drafters import DraftModelDrafter, NgramDrafter
from rlhfspec.engine.drafters.base import Drafter, Proposal
from rlhfspec.strategy.cost_model import CostModel
from rlhfspec.strategy.selector import AdaptiveStrategy
from tests.conftest import random_prompts, tiny_hf_model


class OracleDrafter(Drafter):
    """Proposes the plain greedy continuation, known in advance: always right, nearly free."""

    name = "oracle"

    def __init__(self, continuations: dict[int, list[int]]):
        self.continuations = continuations

    def propose(self, seqs, n):
        return Proposal([self.continuations[s.sample_id][len(s.tokens) : len(s.tokens) + k] for s, k in zip(seqs, n)], None)


def grid(f):
    return {(b, q): f(b, q) for b in (1, 2, 4, 8) for q in (1, 3, 5, 9)}


@pytest.fixture(scope="module")
def greedy(tmp_path_factory):
    """A tiny policy, prompts, greedy params, and the plain outputs at batch 2."""
    path = tmp_path_factory.mktemp("llama")
    tiny_hf_model("llama").save_pretrained(path)
    policy, _ = load_model(path, dtype="float32")
    prompts = random_prompts(4, policy.config.vocab_size, 3, 12, seed=3)
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    return policy, prompts, params, generate(policy, prompts, params, batch_size=2)


def run_with_costs(greedy, verify_seconds):
    """Greedy generation at batch 2 under the adaptive strategy, with the oracle as its drafter and
    verify_seconds(b, q) as its cost profile; returns (token ids, step records)."""
    policy, prompts, params, plain = greedy
    oracle = OracleDrafter({o.sample_id: o.token_ids for o in plain})
    # smoothing 0: the decisions follow these prices alone. Corrected by this machine's measured step
    # times, one slow step (another process, a page fault) could price a draft length out for good.
    strategy = AdaptiveStrategy(CostModel(grid(verify_seconds), {"oracle": grid(lambda b, n: 1e-6 * n)}, smoothing=0))
    stats = []
    out = generate(policy, prompts, params, batch_size=2, drafter=oracle, strategy=strategy, instance_stats=stats)
    return [o.token_ids for o in out], stats[0].records


def test_it_drafts_long_when_extra_verified_tokens_are_nearly_free(greedy):
    tokens, records = run_with_costs(greedy, lambda b, q: 0.01 + 1e-5 * b * q)
    assert tokens == [o.token_ids for o in greedy[3]]
    drafted = [r for r in records if r.drafter == "oracle"]
    assert len(drafted) >= 0.8 * len(records)
    assert all(r.accepted == r.drafted for r in drafted)  # the oracle is always right
    assert sum(sum(r.n) for r in drafted) >= 4 * sum(len(r.n) for r in drafted)  # drafts of 4+ on average


def test_it_decodes_plainly_when_every_extra_token_costs_more_than_it_brings(greedy):
    # Verification time grows with the square of the tokens per row: a draft never pays.
    tokens, records = run_with_costs(greedy, lambda b, q: 0.01 * b * q * q)
    assert tokens == [o.token_ids for o in greedy[3]]
    assert records and all(r.drafter is None and not any(r.n) for r in records)


def test_adaptive_generation_equals_plain_greedy_and_records_its_choices(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFSPEC_CACHE", str(tmp_path))
    policy, _ = load_model(tiny_checkpoint("llama"), dtype="float32")
    draft, _ = load_model(tiny_checkpoint("llama", seed=1, num_hidden_layers=1), dtype="float32")
    prompts = [p + p for p in random_prompts(12, policy.config.vocab_size, 3, 12, seed=2)]
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    plain = generate(policy, prompts, params)
    stats = []
    adaptive = generate(policy, prompts, params, drafter=[NgramDrafter(), DraftModelDrafter(draft, policy)], strategy="adaptive", instance_stats=stats)
    assert [o.token_ids for o in adaptive] == [o.token_ids for o in plain]
    records = stats[0].records
    assert records and all(r.batch >= 1 and r.verify_s > 0 for r in records)
    assert {r.drafter for r in records} - {None, "ngram", "draft"} == set()
    assert (tmp_path / "profiles").is_dir()  # the cost profile is cached for the next run
