"""The eagle drafter: lossless (greedy equality, exact sampling statistics), its head cache always
built from the policy's real features, placement independence through batching and migration,
saving and loading, and clear errors."""

import pytest
import torch

from rlhfspec import RlhfspecError, SamplingParams, generate, load_model
from rlhfspec.distill.eagle import new_head
from rlhfspec.engine.drafters import EagleDrafter
from rlhfspec.engine.instance import GenerationInstance
from rlhfspec.engine.sequence import Sequence
from rlhfspec.engine.spec import Eagle, drafter_spec
from rlhfspec.models.batch import hidden_states, padded_batch
from rlhfspec.models.eagle import EagleHead
from rlhfspec.models.kv_cache import KVCache
from rlhfspec.rollout.backend import InprocBackend
from rlhfspec.rollout.coordinator import Coordinator
from rlhfspec.strategy.base import StaticStrategy
from tests.conftest import random_prompts
from tests.engine.test_spec import MixedN
from tests.engine.test_spec_statistics import N, PROMPT, SETTINGS, chi_square_p_value, exact_joint
from tests.rollout.test_coordinator import RandomMoves


def _head(policy, vocab=None, seed=1, scale=0.3):
    """A head with random weights big enough that its q differs from step to step and sample to sample."""
    head = new_head(policy, vocab or list(range(policy.config.vocab_size)), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=0.05))
    return head.eval().requires_grad_(False)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_greedy_speculative_equals_greedy_plain(policy, n):
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    prompts = random_prompts(12, policy.config.vocab_size, 2, 18, seed=n)
    plain = generate(policy, prompts, params)
    head = _head(policy, vocab=list(range(0, policy.config.vocab_size, 2)))  # never drafts an odd token
    stats = []
    batched = generate(policy, prompts, params, drafter=head, num_draft_tokens=n, instance_stats=stats)
    single = generate(policy, prompts[:1], params, drafter=head, num_draft_tokens=n)
    mixed = generate(policy, prompts, params, drafter=EagleDrafter(head, policy), strategy=MixedN("eagle"))
    assert [o.token_ids for o in batched] == [o.token_ids for o in plain]
    assert single[0].token_ids == plain[0].token_ids
    assert [o.token_ids for o in mixed] == [o.token_ids for o in plain]
    assert stats[0].proposed > 0


@pytest.mark.parametrize("setting", [0, 2])
def test_eagle_sequences_follow_the_exact_distribution(small, setting):
    policy, hf = small
    params = SETTINGS[setting]
    head = _head(policy, vocab=[0, 1, 2, 3, 5, 6], seed=2, scale=1.0)  # q = 0 on tokens 4 and 7
    stats = []
    outs = generate(policy, [PROMPT] * N, params, seed=12, batch_size=N, drafter=head, num_draft_tokens=2, instance_stats=stats)
    assert 0.05 < stats[0].acceptance < 0.95  # the head disagrees often enough to test rejections
    assert chi_square_p_value([o.token_ids for o in outs], exact_joint(hf, params)) > 0.001


def _fresh_head_rows(policy, head, tokens):
    """The head's KV rows for inputs (f_t, x_{t+1}), t < len(tokens) - 1, from one fresh policy forward."""
    feats = policy.normed(hidden_states(policy, *padded_batch([tokens]))[0])
    cache = KVCache(head.config, 1, len(tokens) + 1, head.dtype)
    head.ensure_positions(len(tokens) + 1)
    with torch.inference_mode():
        att = cache.attend([0], [len(tokens) - 1])
        embeds = torch.nn.functional.embedding(torch.tensor(tokens[1:]), policy.embed.weight)
        head(feats[:-1], embeds, att.positions, att)
        cache.advance([0], [len(tokens) - 1])
    return cache.rows(0)


@pytest.mark.parametrize("branches", [1, 2])  # chains, and trees of 2
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_head_cache_holds_only_rows_from_the_policys_real_features(policy, temperature, branches):
    head = _head(policy)
    drafter = EagleDrafter(head, policy, branches=branches)
    params = SamplingParams(temperature=temperature, max_new_tokens=40, ignore_eos=True)
    inst = GenerationInstance(policy, 4, 64, drafters=[drafter], strategy=MixedN("eagle"))
    inst.add([Sequence(i, p, params, seed=1) for i, p in enumerate(random_prompts(4, policy.config.vocab_size, 3, 9, seed=8))])
    for _ in range(8):
        inst.step()
        for s in inst.live:
            seq = s.prompt + s.tokens
            m = drafter.cache.lengths[s.slot]
            assert m + drafter._pending(s.slot).shape[0] == len(seq) - 1 == inst.cache.lengths[s.slot]
            fresh = _fresh_head_rows(policy, head, seq[: m + 1])
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(drafter.cache.rows(s.slot), fresh))
    assert any(r.drafted and sum(r.accepted) and r.branches == branches for r in inst.stats.records)


@pytest.mark.parametrize("branches", [1, 3])
def test_eagle_samples_do_not_depend_on_their_batch(policy, branches):
    head = _head(policy)
    drafter = (lambda: head) if branches == 1 else (lambda: EagleDrafter(head, policy, branches=branches))
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=24, ignore_eos=True)
    prompts = random_prompts(9, policy.config.vocab_size, 2, 20, seed=6)
    prompts += [prompts[0], prompts[0], prompts[5]]  # samples sharing a prompt share its prefill and features
    batched = generate(policy, prompts, params, seed=9, drafter=drafter(), num_draft_tokens=3)
    for i in (0, 5, 9, 10, 11):
        alone = generate(policy, [prompts[i]], params, seed=9, sample_ids=[i], drafter=drafter(), num_draft_tokens=3)[0]
        assert alone.token_ids == batched[i].token_ids


@pytest.mark.parametrize("ship_kv, branches", [(True, 1), (False, 1), (True, 2)])
def test_migration_keeps_eagle_outputs_identical(policy, ship_kv, branches):
    head = _head(policy)
    params = SamplingParams(temperature=1.0, max_new_tokens=30, ignore_eos=True)
    prompts = random_prompts(16, policy.config.vocab_size, 2, 14, seed=0)

    def run(moves):
        def make(i):
            drafter = EagleDrafter(head, policy, branches=branches) if i == 0 else EagleDrafter(head, branches=branches).replica()
            return GenerationInstance(policy, 4, 64, drafters=[drafter], strategy=StaticStrategy("eagle", 3))

        coord = Coordinator(InprocBackend(make, 3), steps_per_call=3, forced_moves=moves)
        return coord, coord.run([Sequence(i, p, params, seed=5) for i, p in enumerate(prompts)])

    coord, moved = run(RandomMoves(1, ship_kv))
    _, still = run(None)
    assert len(coord.timeline.moves) >= 4
    assert [s.tokens for s in moved] == [s.tokens for s in still]


def test_a_saved_head_loads_and_is_detected_by_path(policy, tmp_path):
    head = _head(policy, vocab=list(range(3, 90)))
    path = head.save(tmp_path / "head")
    loaded = EagleHead.load(path)
    assert loaded.vocab.tolist() == list(range(3, 90))
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))
    assert isinstance(drafter_spec(str(path)), Eagle) and drafter_spec("eagle").name == "eagle"
    params = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)
    prompts = random_prompts(4, policy.config.vocab_size, 2, 10, seed=3)
    by_path = generate(policy, prompts, params, seed=2, drafter=str(path), num_draft_tokens=3)
    by_object = generate(policy, prompts, params, seed=2, drafter=head, num_draft_tokens=3)
    assert [o.token_ids for o in by_path] == [o.token_ids for o in by_object]
    with pytest.raises(RlhfspecError, match="the eagle head does not exist; create it with: rlhfspec distill-draft --kind eagle"):
        Eagle(str(tmp_path / "missing")).build(policy)


def test_a_policy_whose_pad_token_lies_past_the_draft_vocabulary_gets_a_head_that_saves_and_loads(tiny_checkpoint, tmp_path):
    """The head embeds nothing, so the policy's pad_token_id (which transformers' embedding
    honours, and rlhfspec's too) is not carried into it, where it could exceed the draft vocabulary."""
    policy, _ = load_model(tiny_checkpoint("llama", pad_token_id=90), dtype="float32")
    head = new_head(policy, list(range(3, 40)))
    assert head.config.pad_token_id is None
    loaded = EagleHead.load(head.save(tmp_path / "head"))
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))


def test_a_head_for_another_policy_is_one_clear_error(policy, tiny_checkpoint):
    head = _head(policy)
    narrow, _ = load_model(tiny_checkpoint("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1), dtype="float32")
    wide_vocab, _ = load_model(tiny_checkpoint("llama", vocab_size=120), dtype="float32")
    with pytest.raises(RlhfspecError, match="reads 64-wide features but the policy's hidden size is 32"):
        generate(narrow, [[4, 5, 6]], SamplingParams(max_new_tokens=4), drafter=head)
    with pytest.raises(RlhfspecError, match="made for a vocabulary of 96 tokens but the policy's has 120"):
        EagleDrafter(head, wide_vocab)
