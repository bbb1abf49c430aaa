"""Batched generation on tiny random models: placement independence, stopping, logprobs, errors."""

import pytest
import torch

from rlhfspec import RlhfspecError, SamplingParams, generate, load_model
from rlhfspec.engine.instance import GenerationInstance
from rlhfspec.engine.sampling import processed_logprobs
from rlhfspec.engine.sequence import Sequence
from tests.conftest import random_prompts, tiny_hf_model, drive


@pytest.fixture
def tiny(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("llama"), dtype="float32")
    return model


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0, max_new_tokens=24, ignore_eos=True), SamplingParams(temperature=0.8, top_k=10, top_p=0.9, max_new_tokens=24)],
)
def test_a_samples_tokens_do_not_depend_on_its_batch_or_slot(tiny, params):
    prompts = random_prompts(16, tiny.config.vocab_size, 2, 20, seed=11)
    together = generate(tiny, prompts, params, seed=7)
    refilled = generate(tiny, prompts, params, seed=7, batch_size=3)  # continuous batching, other slots
    for i in (0, 5, 15):
        alone = generate(tiny, [prompts[i]], params, seed=7, sample_ids=[i])[0]
        assert together[i].token_ids == refilled[i].token_ids == alone.token_ids
        assert torch.allclose(torch.tensor(together[i].logprobs), torch.tensor(alone.logprobs), atol=1e-5)
    assert any(together[i].token_ids != together[j].token_ids for i in range(4) for j in range(4) if i != j)


def test_samples_sharing_a_prompt_share_its_prefill_and_draw_their_own_tokens(tiny):
    distinct = random_prompts(4, tiny.config.vocab_size, 3, 20, seed=12)
    prompts = [distinct[0]] * 4 + [distinct[1]] + [distinct[2]] * 3 + [distinct[3]] * 2 + [distinct[0]]
    params = SamplingParams(temperature=1.0, max_new_tokens=20, ignore_eos=True)
    stats: list = []
    together = generate(tiny, prompts, params, seed=7, instance_stats=stats)
    assert stats[0].prefill_tokens == sum(len(p) for p in distinct)  # each prompt computed once
    assert stats[0].shared_prefill_tokens == sum(len(p) for p in prompts) - sum(len(p) for p in distinct)
    refilled = generate(tiny, prompts, params, seed=7, batch_size=3)  # groups split over several admissions
    for i in range(len(prompts)):
        alone = generate(tiny, [prompts[i]], params, seed=7, sample_ids=[i])[0]
        assert together[i].token_ids == refilled[i].token_ids == alone.token_ids
        assert together[i].logprobs == alone.logprobs  # the copied rows are the computed ones, bit for bit
    assert len({tuple(together[i].token_ids) for i in range(4)}) == 4  # one prompt, four samples


def test_different_seeds_give_different_samples(tiny):
    p = random_prompts(1, tiny.config.vocab_size, 5, 5)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    assert generate(tiny, p, params, seed=0)[0].token_ids != generate(tiny, p, params, seed=1)[0].token_ids


def test_logprobs_are_the_processed_distribution_of_the_full_sequence(tiny, tiny_checkpoint):
    ref = tiny_hf_model("llama")
    prompts = random_prompts(3, tiny.config.vocab_size, 3, 9, seed=2)
    params = SamplingParams(temperature=0.9, top_k=12, max_new_tokens=10, ignore_eos=True)
    for out in generate(tiny, prompts, params, seed=3):
        seq = out.prompt_token_ids + out.token_ids
        with torch.no_grad():
            logits = ref(torch.tensor([seq])).logits[0, len(out.prompt_token_ids) - 1 : -1]
        want = processed_logprobs(logits, params).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(out.logprobs), want, atol=1e-4)


def test_greedy_equals_transformers_greedy(tiny):
    ref = tiny_hf_model("llama")
    prompts = random_prompts(5, tiny.config.vocab_size, 2, 12, seed=4)
    outs = generate(tiny, prompts, SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))
    for p, o in zip(prompts, outs):
        want = ref.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p) :]
        assert o.token_ids == want.tolist()


def test_stops_at_eos_and_at_max_new_tokens(tiny):
    prompt = random_prompts(1, tiny.config.vocab_size, 6, 6, seed=9)[0]
    free = generate(tiny, [prompt], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))[0]
    assert len(free.token_ids) == 12 and free.finish_reason == "length"
    eos = free.token_ids[4]
    inst = GenerationInstance(tiny, 2, 64, eos_ids=(eos,))
    seq = Sequence(0, prompt, SamplingParams(temperature=0, max_new_tokens=12))
    drive(inst, [seq])
    cut = free.token_ids.index(eos) + 1
    assert seq.tokens == free.token_ids[:cut] and seq.finish_reason == "stop"
    assert inst.free_slots == 2


def test_finished_samples_free_their_slots_and_the_live_batch_stays_dense(tiny):
    inst = GenerationInstance(tiny, 4, 64)
    lengths = [3, 7, 1, 5]
    seqs = [Sequence(i, [5, 6, 7], SamplingParams(max_new_tokens=n, ignore_eos=True)) for i, n in enumerate(lengths)]
    inst.add(seqs)
    while inst.live:
        inst.step()
        assert [s.slot for s in inst.live] == list(range(len(inst.live)))
        for s in inst.live:
            assert inst.cache.lengths[s.slot] == s.length - 1
    assert [len(s.tokens) for s in seqs] == lengths


def test_bad_inputs_are_one_sentence_errors_naming_the_culprit(tiny):
    params = SamplingParams(max_new_tokens=8)
    with pytest.raises(RlhfspecError, match="prompt 1 is empty"):
        generate(tiny, [[4, 5], []], params)
    with pytest.raises(RlhfspecError, match="prompt 0 is 300 tokens.*256"):
        generate(tiny, [[4] * 300], params)
    with pytest.raises(RlhfspecError, match="token id 500"):
        generate(tiny, [[4, 500]], params)
    inst = GenerationInstance(tiny, 2, 32)
    with pytest.raises(RlhfspecError, match="3 samples do not fit.*2 free slots"):
        inst.add([Sequence(i, [4, 5], params) for i in range(3)])
    with pytest.raises(RlhfspecError, match="prompt 0 is 30 tokens.*max_len is 32"):
        inst.add([Sequence(0, [4] * 30, params)])
    with pytest.raises(RlhfspecError, match="stop strings but no tokenizer"):
        generate(tiny, [[4, 5]], SamplingParams(stop=("x",)))


def test_drafters_passed_as_objects_and_names_keep_their_order(tiny):
    """The static strategy drafts with the first drafter given, whatever mix of names and objects."""
    from rlhfspec.engine.drafters import NgramDrafter
    from rlhfspec.rollout.generate import engine_spec

    class Mine(NgramDrafter):
        name = "mine"

    _, live = engine_spec(tiny, drafter=["ngram", Mine()], instances=2)
    assert [d.name for d in live[0][0]] == ["ngram", "mine"] and live[0][1].drafter == "ngram"
    assert [d.name for d in live[1][0]] == ["ngram", "mine"] and live[1][0][0] is not live[0][0][0]  # replicas
    spec, live = engine_spec(tiny, drafter=["ngram", "/some/draft"], strategy="threshold")
    assert live is None and [d.name for d in spec.drafters] == ["ngram", "draft"] and spec.strategy.drafter == "ngram"
