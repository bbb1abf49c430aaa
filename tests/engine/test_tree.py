"""Speculative trees: the tree-masked forward scores every node as a causal forward of its own
path would, the accepted path's cache rows are a chain's, and tree verification is lossless
(greedy equality, exact sampling statistics, a broken multi-round rule caught). Placement
independence, migration and the head's cache under trees are test_eagle.py's tests, run with branches."""

import pytest
import torch

import rlhfspec.engine.tree as tree_mod
from rlhfspec import RlhfspecError, SamplingParams, generate
from rlhfspec.engine.drafters import EagleDrafter
from rlhfspec.engine.spec import TREE_BRANCHES, Eagle, drafter_spec
from rlhfspec.engine.tree import tree_rows
from rlhfspec.models.batch import hidden_states, padded_batch
from rlhfspec.models.kv_cache import KVCache
from tests.conftest import random_prompts
from tests.engine.test_eagle import _head
from tests.engine.test_spec import MixedN
from tests.engine.test_spec_statistics import N, PROMPT, SETTINGS, chi_square_p_value, exact_joint


@pytest.mark.parametrize("invariant", [True, False])
def test_every_tree_node_is_scored_as_its_own_path_and_the_kept_path_is_a_chain(policy, invariant):
    prompt, last, k, n = [3, 9, 4, 17, 2], 11, 3, 3
    branches = [[20, 21, 22], [23, 24, 25], [26, 27, 28]]
    policy.ensure_positions(40)
    cache = KVCache(policy.config, 2, 40, policy.dtype, invariant=invariant)
    with torch.inference_mode():
        cache.forward(policy, [1], [prompt])
        start = cache.lengths[1]
        fed = [last] + [t for b in branches for t in b]
        hidden = cache.forward(policy, [1], [fed], last_only=False, tree=tree_rows([start], [n], k))
        for i, chain in enumerate(branches):
            for j in range(n + 1):  # the root, then branch i's nodes
                path = [last] + chain[:j]
                ref = KVCache(policy.config, 1, 40, policy.dtype, invariant=invariant)
                ref.forward(policy, [0], [prompt])
                want = ref.forward(policy, [0], [path], last_only=False)[-1]
                row = 0 if j == 0 else 1 + i * n + j - 1
                assert torch.allclose(hidden[row], want, atol=1e-5), (i, j)
        # Keep branch 2's first two nodes: the slot's rows become the chain [prompt, last, 26, 27].
        cache.keep(1, start, [start, start + 1 + 2 * n, start + 2 + 2 * n])
        ref = KVCache(policy.config, 1, 40, policy.dtype, invariant=invariant)
        ref.forward(policy, [0], [prompt + [last, 26, 27]])
    assert cache.lengths[1] == ref.lengths[0] == len(prompt) + 3
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(cache.rows(1), ref.rows(0)))


@pytest.mark.parametrize("branches", [2, 3])
def test_greedy_tree_speculation_equals_greedy_plain(policy, branches):
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    prompts = random_prompts(12, policy.config.vocab_size, 2, 18, seed=branches)
    plain = generate(policy, prompts, params)
    head = _head(policy, vocab=list(range(0, policy.config.vocab_size, 2)))  # never drafts an odd token
    stats, chain_stats = [], []
    tree = generate(policy, prompts, params, drafter=EagleDrafter(head, policy, branches=branches), num_draft_tokens=3, instance_stats=stats)
    chain = generate(policy, prompts, params, drafter=EagleDrafter(head, policy), num_draft_tokens=3, instance_stats=chain_stats)
    mixed = generate(policy, prompts, params, drafter=EagleDrafter(head, policy, branches=branches), strategy=MixedN("eagle"))
    assert [o.token_ids for o in chain] == [o.token_ids for o in plain]
    # A tree node sees keys with other branches' rows masked between them, so its logits equal a
    # chain's up to rounding, not bit for bit: tree and plain may part only at a near-tie.
    for outs in (tree, mixed):
        for prompt, got, want in zip(prompts, outs, plain):
            _same_or_parted_at_a_near_tie(policy, prompt, got.token_ids, want.token_ids)
    # More first drafts to choose from: more accepted per step than the chain.
    assert stats[0].tokens_per_step > chain_stats[0].tokens_per_step


def _same_or_parted_at_a_near_tie(policy, prompt, got, want):
    t = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if t is None:
        assert got == want
        return
    with torch.inference_mode():
        logits = policy.logits(hidden_states(policy, *padded_batch([prompt + want[:t]]))[0, -1:])[0]
    top = logits.topk(2).values
    assert float(top[0] - top[1]) < 1e-4, f"greedy tree and plain part at token {t} without a near-tie"


@pytest.mark.parametrize("setting, branches", [(0, 2), (2, 3)])
def test_tree_sequences_follow_the_exact_distribution(small, setting, branches):
    policy, hf = small
    params = SETTINGS[setting]
    head = _head(policy, vocab=[0, 1, 2, 3, 5, 6], seed=2, scale=1.0)  # q = 0 on tokens 4 and 7
    stats = []
    outs = generate(policy, [PROMPT] * N, params, seed=12, batch_size=N, drafter=EagleDrafter(head, policy, branches=branches),
                    num_draft_tokens=2, instance_stats=stats)
    assert 0.05 < stats[0].acceptance < 0.95
    assert chi_square_p_value([o.token_ids for o in outs], exact_joint(hf, params)) > 0.001


def test_a_multi_round_rule_without_residuals_fails_the_same_test(small, monkeypatch):
    policy, hf = small
    params = SETTINGS[0]
    # Testing every candidate against p itself (no residual between rounds) over-accepts drafts.
    monkeypatch.setattr(tree_mod, "residual_distribution", lambda p, q, d: p)
    head = _head(policy, vocab=[0, 1, 2, 3, 5, 6], seed=2, scale=1.0)
    outs = generate(policy, [PROMPT] * N, params, seed=12, batch_size=N, drafter=EagleDrafter(head, policy, branches=3), num_draft_tokens=2)
    assert chi_square_p_value([o.token_ids for o in outs], exact_joint(hf, params)) < 1e-6


def test_branches_must_be_a_positive_integer(policy):
    with pytest.raises(RlhfspecError, match="branches is 0; it must be an integer >= 1"):
        EagleDrafter(_head(policy), policy, branches=0)


def test_eagle_tree_names_the_default_head_drafting_trees(policy, tmp_path):
    spec = drafter_spec("eagle-tree")
    assert isinstance(spec, Eagle) and spec.name == "eagle-tree" and spec.branches == TREE_BRANCHES > 1
    assert spec.path == drafter_spec("eagle").path
    path = _head(policy).save(tmp_path / "head")
    built = Eagle(str(path), "mine", branches=3).build(policy)
    assert isinstance(built, EagleDrafter) and built.branches == 3 and built.replica().branches == 3
    with pytest.raises(RlhfspecError, match="drafter mine: branches is 0; it must be an integer >= 1"):
        Eagle(str(path), "mine", branches=0)
