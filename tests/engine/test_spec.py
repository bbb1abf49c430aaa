"""Speculative decoding is lossless: exact accept/resample algebra, greedy equality, sampling statistics,
placement independence, cache rollback, and clear errors."""

import pytest
import torch

from rlhfspec import RlhfspecError, SamplingParams, generate, load_model
from rlhfspec.engine.drafters import DraftModelDrafter, NgramDrafter
from rlhfspec.engine.instance import GenerationInstance
from rlhfspec.engine.sequence import Sequence
from rlhfspec.engine.verify import acceptance_probability, residual_distribution
from rlhfspec.models.kv_cache import KVCache
from rlhfspec.strategy.base import Decision, StaticStrategy, Strategy
from tests.conftest import random_prompts


def _random_dist(v, g, zeros=()):
    x = torch.rand(v, generator=g, dtype=torch.float64) + 0.05
    x[list(zeros)] = 0
    return x / x.sum()


def _first_token_distribution(p, q):
    """Exact P(first emitted token) under the rule, enumerating the draft token (no sampling)."""
    out = torch.zeros_like(p)
    for d in range(len(p)):
        if q[d] == 0:
            continue
        a = acceptance_probability(p[None], q[None], torch.tensor([d]))[0]
        r = residual_distribution(p[None], q[None], torch.tensor([d]))[0]
        out[d] += q[d] * a
        out += q[d] * (1 - a) * r
    return out


def test_accept_resample_rule_reproduces_p_exactly():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        v = 2 + trial % 7
        p = _random_dist(v, g, zeros=[0] if trial % 3 == 0 else [])
        q = _random_dist(v, g, zeros=[v - 1] if trial % 2 else [])  # q may miss tokens p has
        assert torch.allclose(_first_token_distribution(p, q), p, atol=1e-12)


def test_one_hot_drafts_reproduce_p_exactly():
    g = torch.Generator().manual_seed(1)
    for v in range(2, 9):
        p = _random_dist(v, g, zeros=[1] if v > 3 else [])
        for d in range(v):
            a = acceptance_probability(p[None], None, torch.tensor([d]))[0]
            r = residual_distribution(p[None], None, torch.tensor([d]))[0]
            emitted = (1 - a) * r
            emitted[d] += a
            assert torch.allclose(emitted, p, atol=1e-12)


def test_always_accepting_would_not_reproduce_p():
    g = torch.Generator().manual_seed(2)
    p, q = _random_dist(5, g), _random_dist(5, g)
    assert not torch.allclose(q, p, atol=1e-3)  # what "always accept" emits is q


@pytest.fixture
def pair(tiny_checkpoint):
    """A tiny policy and a different tiny model over the same vocabulary as its drafter."""
    policy, _ = load_model(tiny_checkpoint("llama", seed=0), dtype="float32")
    draft, _ = load_model(tiny_checkpoint("llama", seed=1, num_hidden_layers=1), dtype="float32")
    return policy, draft


class MixedN(Strategy):
    """Per-sample draft lengths that change every step (0 included)."""

    def __init__(self, drafter):
        self.drafter, self.t = drafter, 0

    def decide(self, w):
        self.t += 1
        return Decision(self.drafter, [(sid * 7 + self.t) % 7 for sid in w.sample_ids])


@pytest.mark.parametrize("n", range(1, 7))
@pytest.mark.parametrize("which", ["self", "draft", "ngram"])
def test_greedy_speculative_equals_greedy_plain(pair, n, which):
    policy, draft = pair
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    prompts = random_prompts(16, policy.config.vocab_size, 2, 18, seed=n)
    # Repetitive prompts give the n-gram drafter something to find.
    prompts = [p + p[: len(p) // 2] for p in prompts]
    plain = generate(policy, prompts, params)
    spec = {"self": policy, "draft": draft, "ngram": "ngram"}[which]
    batched = generate(policy, prompts, params, drafter=spec, num_draft_tokens=n)
    single = generate(policy, prompts[:1], params, drafter=spec, num_draft_tokens=n)
    assert [o.token_ids for o in batched] == [o.token_ids for o in plain]
    assert single[0].token_ids == plain[0].token_ids
    drafter = DraftModelDrafter(draft, policy) if which == "draft" else (NgramDrafter() if which == "ngram" else DraftModelDrafter(policy, policy))
    mixed = generate(policy, prompts, params, drafter=drafter, strategy=MixedN(drafter.name))
    assert [o.token_ids for o in mixed] == [o.token_ids for o in plain]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_policy_drafting_for_itself_is_always_accepted_and_changes_nothing(pair, temperature):
    policy, _ = pair
    params = SamplingParams(temperature=temperature, max_new_tokens=24, ignore_eos=True)
    prompts = random_prompts(8, policy.config.vocab_size, 3, 12, seed=4)
    plain = generate(policy, prompts, params, seed=5)
    stats = []
    spec = generate(policy, prompts, params, seed=5, drafter=policy, num_draft_tokens=4, instance_stats=stats)
    assert stats[0].acceptance == 1.0
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_speculative_samples_do_not_depend_on_their_batch(pair):
    policy, draft = pair
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=24, ignore_eos=True)
    prompts = random_prompts(16, policy.config.vocab_size, 2, 20, seed=6)
    batched = generate(policy, prompts, params, seed=9, drafter=draft, num_draft_tokens=3)
    for i in (0, 7, 15):
        alone = generate(policy, [prompts[i]], params, seed=9, sample_ids=[i], drafter=draft, num_draft_tokens=3)[0]
        assert alone.token_ids == batched[i].token_ids


def _fresh_rows(model, tokens):
    cache = KVCache(model.config, 1, len(tokens) + 1, model.dtype)
    model.ensure_positions(len(tokens) + 1)
    with torch.inference_mode():
        att = cache.attend([0], [len(tokens)])
        model(torch.tensor(tokens), att.positions, att)
        cache.advance([0], [len(tokens)])
    return cache.rows(0)


@pytest.mark.parametrize("use_self", [False, True])
def test_after_rollback_both_caches_equal_a_fresh_prefill_of_the_kept_tokens(pair, use_self):
    policy, draft = pair
    drafter = DraftModelDrafter(policy if use_self else draft, policy)
    params = SamplingParams(temperature=0.0 if use_self else 1.0, max_new_tokens=30, ignore_eos=True)
    inst = GenerationInstance(policy, 4, 64, drafters=[drafter], strategy=StaticStrategy("draft", 3))
    inst.add([Sequence(i, p, params, seed=1) for i, p in enumerate(random_prompts(4, policy.config.vocab_size, 3, 9, seed=8))])
    full_acceptances = 0
    for _ in range(5):
        inst.step()
        full_acceptances += sum(a == n for a, n in zip(inst.stats.records[-1].accepted, inst.stats.records[-1].drafted) if n)
        for s in inst.live:
            seq = s.prompt + s.tokens
            n = inst.cache.lengths[s.slot]
            assert n == len(seq) - 1
            # Bitwise: a recomputed prefix equals the rows written step by step (batch invariance).
            assert all(torch.equal(a, b) for a, b in zip(inst.cache.rows(s.slot), _fresh_rows(policy, seq[:-1])))
            m = drafter.cache.lengths[s.slot]
            assert m <= len(seq) - 1
            assert all(torch.equal(a, b) for a, b in zip(drafter.cache.rows(s.slot), _fresh_rows(drafter.model, seq[:m])))
    if use_self:
        assert full_acceptances > 0  # the off-by-one case was exercised


def test_drafter_vocabulary_mismatch_names_both_sizes(tiny_checkpoint):
    policy, _ = load_model(tiny_checkpoint("llama"), dtype="float32")
    other, _ = load_model(tiny_checkpoint("llama", vocab_size=80), dtype="float32")
    with pytest.raises(RlhfspecError, match="80 tokens but the policy's has 96"):
        DraftModelDrafter(other, policy)


def test_drafter_tokenizer_mismatch_names_the_first_differing_token(tiny_checkpoint):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    def tok(words):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])))

    words = [f"w{i}" for i in range(96)]
    changed = list(words)
    changed[5] = "five"
    policy, _ = load_model(tiny_checkpoint("llama"), dtype="float32")
    with pytest.raises(RlhfspecError, match="token 5 is 'five' but the policy's is 'w5'"):
        DraftModelDrafter(policy, policy, tokenizer=tok(changed), policy_tokenizer=tok(words))


def test_bad_draft_lengths_are_clear_errors(pair):
    policy, draft = pair
    p = [[4, 5, 6]]
    with pytest.raises(RlhfspecError, match="num_draft_tokens is -1"):
        generate(policy, p, SamplingParams(max_new_tokens=4), drafter="ngram", num_draft_tokens=-1)
    with pytest.raises(RlhfspecError, match="num_draft_tokens is 17; the maximum is 16"):
        generate(policy, p, SamplingParams(max_new_tokens=4), drafter="ngram", num_draft_tokens=17)
    inst = GenerationInstance(policy, 1, 16, drafters=[NgramDrafter()])
    inst.add([Sequence(0, [4, 5], SamplingParams(max_new_tokens=8))])
    with pytest.raises(RlhfspecError, match="draft lengths must be >= 0"):
        inst.step(Decision("ngram", [-2]))
    with pytest.raises(RlhfspecError, match="drafter 'draft' is not attached"):
        inst.step(Decision("draft", [2]))


def test_a_reduced_draft_vocabulary_stays_lossless_and_follows_weight_updates(pair):
    policy, draft = pair
    vocab = list(range(0, policy.config.vocab_size, 2))  # q = 0 on every odd id
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    prompts = random_prompts(8, policy.config.vocab_size, 2, 12, seed=9)
    plain = generate(policy, prompts, params)
    spec = generate(policy, prompts, params, drafter=DraftModelDrafter(draft, policy, draft_vocab=vocab), num_draft_tokens=3)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]

    def proposal(drafter, temperature=1.0):
        inst = GenerationInstance(policy, 1, 32, drafters=[drafter])
        inst.add([Sequence(0, prompts[0], SamplingParams(temperature=temperature, max_new_tokens=8), seed=3)])
        return drafter.propose(inst.live, [3])

    drafter = DraftModelDrafter(draft, policy, draft_vocab=vocab)
    before = proposal(drafter)
    assert all(t % 2 == 0 for t in before.tokens[0]) and before.q[:, 1::2].sum() == 0
    # An in-place update (as drafter refresh does) must reach the cached output-layer rows.
    head = draft.head_weight
    with torch.no_grad():
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    after = proposal(drafter)
    fresh = proposal(DraftModelDrafter(draft, policy, draft_vocab=vocab))
    assert not torch.allclose(before.q, after.q)
    assert after.tokens == fresh.tokens and torch.allclose(after.q, fresh.q)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_one_hot_drafts_emit_the_very_tokens_plain_sampling_draws(pair, temperature):
    """The n-gram drafter's accept rule is coupled to plain sampling's own random numbers, so sampled
    output does not depend on which steps drafted or how far (the RL run repeats exactly)."""
    policy, _ = pair
    params = SamplingParams(temperature=temperature, top_k=20, max_new_tokens=24, ignore_eos=True)
    prompts = random_prompts(12, policy.config.vocab_size, 2, 14, seed=11)
    prompts = [p + p[: len(p) // 2] for p in prompts]
    plain = generate(policy, prompts, params, seed=2)
    stats = []
    for spec in (generate(policy, prompts, params, seed=2, drafter="ngram", num_draft_tokens=3, instance_stats=stats),
                 generate(policy, prompts, params, seed=2, drafter=NgramDrafter(), strategy=MixedN("ngram"))):
        assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
        for a, b in zip(plain, spec):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    assert stats[0].accepted > 0
