"""Traces: the top-k targets and features an instance keeps while it generates (what a drafter
refresh trains on) equal what a teacher forward over the finished text computes, on every decoding
path: plain steps, eagle chains and trees, a draft model's chains, migration with and without KV,
and samples that stop in the middle of an accepted chain."""

import pytest
import torch

from rlhfspec import RlhfspecError, SamplingParams
from rlhfspec.distill.teacher import teacher_examples
from rlhfspec.engine.drafters import DraftModelDrafter, EagleDrafter
from rlhfspec.engine.instance import GenerationInstance
from rlhfspec.engine.sequence import Sequence
from rlhfspec.engine.spec import EngineSpec
from rlhfspec.models.batch import hidden_states, padded_batch
from rlhfspec.rollout.backend import InprocBackend
from rlhfspec.rollout.coordinator import Coordinator
from tests.conftest import random_prompts
from tests.engine.test_eagle import _head
from tests.engine.test_spec import MixedN
from tests.rollout.test_coordinator import RandomMoves

K = 5


def _check(policy, seqs: list[Sequence], features: bool) -> None:
    """Each finished sample's Trace against the teacher's forward over its prompt + tokens. Ids are
    compared through the policy's logprobs at them, so that two near-equal logits taken in either
    order (kernels round differently on other CPUs) pass."""
    teacher = teacher_examples(policy, [s.prompt + s.tokens for s in seqs], [len(s.prompt) for s in seqs], k=K, features=features)
    for s, t in zip(seqs, teacher):
        ids, logprobs = s.trace.targets()
        assert ids.shape == (len(s.tokens), K)
        torch.testing.assert_close(logprobs, t.top_logprobs, atol=1e-4, rtol=0)
        with torch.no_grad():
            hidden = hidden_states(policy, *padded_batch([s.prompt + s.tokens]))[0, len(s.prompt) - 1 : s.length - 1]
            full = torch.log_softmax(policy.logits(hidden), dim=-1)
        torch.testing.assert_close(full.gather(-1, ids), logprobs, atol=1e-4, rtol=0)
        kept = torch.cat(s.trace.features) if s.trace.features else torch.empty(0)
        if not features:
            assert kept.numel() == 0
            continue
        # Every row the cache kept, in order: positions 0 .. length - 2 (a chain stopped early by
        # its end may have kept more rows than it emitted tokens: those are dropped by whoever reads it).
        assert kept.shape[0] >= s.length - 1
        torch.testing.assert_close(kept[: s.length - 1], t.features[: s.length - 1], atol=1e-4, rtol=0)


def _drafter(policy, kind: str):
    if kind == "draft":
        return DraftModelDrafter(policy, policy)  # the policy drafting for itself: long accepted chains
    return EagleDrafter(_head(policy), policy, branches=2 if kind == "tree" else 1)


@pytest.mark.parametrize("kind", ["plain", "eagle", "tree", "draft"])
def test_a_trace_holds_the_teachers_targets_and_features_of_the_text(policy, kind):
    drafter = None if kind == "plain" else _drafter(policy, kind)
    params = SamplingParams(temperature=0.8, top_k=30, max_new_tokens=24, ignore_eos=True)  # targets stay at temperature 1
    inst = GenerationInstance(policy, 4, 64, drafters=[drafter] if drafter else [], strategy=MixedN(drafter.name) if drafter else None,
                              keep_targets=K)
    seqs = [Sequence(i, p, params, seed=1) for i, p in enumerate(random_prompts(6, policy.config.vocab_size, 2, 12, seed=4))]
    seqs[5].prompt = list(seqs[4].prompt)  # a shared prefill
    done = inst.add(seqs[:4])
    while inst.live or len(done) < len(seqs):
        if inst.free_slots and len(done) + len(inst.live) < len(seqs):
            done += inst.add(seqs[len(done) + len(inst.live) : len(done) + len(inst.live) + inst.free_slots])
        done += inst.step()
    if drafter is not None:
        assert inst.stats.accepted > 0
    _check(policy, sorted(done, key=lambda s: s.sample_id), features=kind in ("eagle", "tree"))


def test_a_sample_stopping_inside_an_accepted_chain_keeps_only_its_emitted_tokens_targets(policy):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, ignore_eos=True)  # ends mid-chain: 10 is not 1 + 4k
    inst = GenerationInstance(policy, 3, 64, drafters=[DraftModelDrafter(policy, policy)], strategy=MixedN("draft"), keep_targets=K)
    seqs = [Sequence(i, p, params, seed=2) for i, p in enumerate(random_prompts(3, policy.config.vocab_size, 3, 8, seed=5))]
    done = inst.add(seqs)
    while inst.live:
        done += inst.step()
    assert all(len(s.tokens) == 10 for s in done)
    _check(policy, sorted(done, key=lambda s: s.sample_id), features=False)


@pytest.mark.parametrize("ship_kv", [True, False])
def test_migrated_samples_keep_one_trace_without_repeating_rows(policy, ship_kv):
    head = _head(policy)
    params = SamplingParams(temperature=1.0, max_new_tokens=20, ignore_eos=True)
    prompts = random_prompts(10, policy.config.vocab_size, 2, 12, seed=7)

    def make(i):
        drafter = EagleDrafter(head, policy) if i == 0 else EagleDrafter(head).replica()
        return GenerationInstance(policy, 4, 64, drafters=[drafter], strategy=MixedN("eagle"), keep_targets=K)

    coord = Coordinator(InprocBackend(make, 3), steps_per_call=2, forced_moves=RandomMoves(1, ship_kv))
    done = coord.run([Sequence(i, p, params, seed=3) for i, p in enumerate(prompts)])
    assert len(coord.timeline.moves) >= 3
    for s in done:  # no row recomputed on adoption is kept twice
        assert sum(f.shape[0] for f in s.trace.features) <= s.length - 1 + 4
    _check(policy, sorted(done, key=lambda s: s.sample_id), features=True)


def test_an_instance_keeps_no_trace_unless_asked_and_a_negative_count_is_a_clear_error(policy):
    inst = GenerationInstance(policy, 2, 32)
    done = inst.add([Sequence(0, [1, 2, 3], SamplingParams(max_new_tokens=1, ignore_eos=True))])
    assert done[0].trace is None
    with pytest.raises(RlhfspecError, match="keep_targets is -1; it must be >= 0"):
        EngineSpec(keep_targets=-1)


def test_a_finished_or_migrating_samples_trace_pickles_to_its_own_rows_only(policy):
    """Trace chunks are views of whole steps' tensors; pickled as they are, each would carry its
    step's whole batch (what a Ray actor ships). Finished and exported samples' Traces are compacted."""
    import pickle

    def own_bytes(trace):
        return sum(t.numel() * t.element_size() for t in [*trace.top_ids, *trace.top_logprobs, *trace.features])

    inst = GenerationInstance(policy, 8, 64, drafters=[EagleDrafter(_head(policy), policy)], strategy=MixedN("eagle"), keep_targets=K)
    params = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)
    done = inst.add([Sequence(i, p, params, seed=1) for i, p in enumerate(random_prompts(8, policy.config.vocab_size, 2, 12, seed=4))])
    for _ in range(4):
        done += inst.step()
    leaving = inst.export([3], with_kv=True)[0].seq
    while inst.live:
        done += inst.step()
    for s in [leaving, *done]:
        assert len(pickle.dumps(s.trace)) < own_bytes(s.trace) + 2048
        assert len(s.trace.top_ids) == len(s.trace.top_logprobs) == len(s.trace.features) == 1
    _check(policy, sorted(done, key=lambda s: s.sample_id), features=True)
