"""The Ray backend on a local cluster these tests start and stop: same outputs as in-process, and an
actor killed mid-rollout loses and duplicates nothing."""

import pytest

from rlhfspec import SamplingParams, generate, load_model
from rlhfspec.engine.sequence import Sequence
from rlhfspec.rollout.coordinator import Coordinator
from rlhfspec.engine.spec import EngineSpec
from rlhfspec.rollout.backend import InprocBackend
from rlhfspec.rollout.rebalance import Rebalancer
from tests.conftest import local_ray, random_prompts
from tests.rollout.test_coordinator import RandomMoves

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    yield from local_ray(2)


@pytest.fixture
def spec(tiny_checkpoint):
    return EngineSpec(max_batch=4, max_len=64, dtype="float32", threads=1, model=str(tiny_checkpoint("llama")))


def seqs(n, params, vocab=96):
    return [Sequence(i, p, params, seed=3) for i, p in enumerate(random_prompts(n, vocab, 2, 14, seed=4))]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ray_equals_inproc_with_reallocation_and_forced_moves(cluster, spec, temperature):
    from rlhfspec.rollout.ray_backend import RayBackend

    params = SamplingParams(temperature=temperature, max_new_tokens=24, ignore_eos=True)
    inproc = Coordinator(InprocBackend(lambda i: spec.build(), 2), steps_per_call=3).run(seqs(12, params))
    backend = RayBackend(spec, 2)
    try:
        coord = Coordinator(backend, Rebalancer(min_gain=0.0), steps_per_call=3, forced_moves=RandomMoves(2, True))
        remote = coord.run(seqs(12, params))
    finally:
        backend.shutdown()
    assert [s.tokens for s in remote] == [s.tokens for s in inproc]
    model, _ = load_model(spec.model, dtype="float32")
    plain = generate(model, [s.prompt for s in seqs(12, params)], params, seed=3)
    assert [s.tokens for s in remote] == [o.token_ids for o in plain]


def test_killing_an_actor_mid_rollout_loses_and_duplicates_nothing(cluster, spec):
    from rlhfspec.rollout.ray_backend import RayBackend

    params = SamplingParams(temperature=1.0, max_new_tokens=30, ignore_eos=True)
    backend = RayBackend(spec, 2)
    original = backend.run_round
    rounds = {"n": 0}

    def killing(steps):
        rounds["n"] += 1
        if rounds["n"] == 3:
            ray.kill(backend.actors[1], no_restart=True)
        yield from original(steps)

    backend.run_round = killing
    try:
        coord = Coordinator(backend, steps_per_call=2)
        out = coord.run(seqs(10, params))
    finally:
        backend.shutdown()
    assert sorted(s.sample_id for s in out) == list(range(10))
    model, _ = load_model(spec.model, dtype="float32")
    plain = generate(model, [s.prompt for s in seqs(10, params)], params, seed=3)
    assert [s.tokens for s in out] == [o.token_ids for o in plain]


def test_weights_packed_into_one_buffer_come_back_bitwise_in_every_dtype():
    import torch

    from rlhfspec.rollout.ray_backend import pack_weights, unpack_weights

    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(3, 5, generator=g), "odd": torch.randn(7, generator=g).to(torch.bfloat16),
             "after": torch.randn(2, 3, generator=g), "ids": torch.arange(5)}
    buf, manifest = pack_weights(state)
    buf.flags.writeable = False  # as Ray hands it to an actor
    out = unpack_weights(buf, manifest)
    assert list(out) == list(state)
    assert all(out[k].dtype == v.dtype and out[k].shape == v.shape and torch.equal(out[k], v) for k, v in state.items())
