"""The rollout/trainer precision gap and its corrections (algorithm.old_logprobs, tis_cap, tis_level):
with every completion enumerated, the expected gradient of the real objective under each correction
is computed exactly, so the comparison with the on-policy gradient has no sampling noise."""

import itertools

import pytest
import torch

from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.loader import load_model
from rlhfspec.rl.config import AlgorithmConfig
from rlhfspec.rl.experience import make_targets
from rlhfspec.rl.logprobs import Batch, all_logprobs, completion_logprobs
from rlhfspec.rl.objective import policy_objective
from rlhfspec.rl.trainer import Trainer
from tests.rl.test_trainer import config

PARAMS = SamplingParams(temperature=1.0)
LENGTH = 2  # every completion of two tokens over the whole vocabulary


def _setup(policy):
    pi, _ = load_model(policy, dtype="float32")
    pi.train().requires_grad_(True)
    # The engine's model: the policy's weights with a perturbation standing in for a precision gap
    # of the size measured between the float32 engine and the bfloat16 trainer on the default run
    # (about 0.027 nats per token on average here, 0.028 there), far above rounding.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the pad token's embedding is zero: completions that hold it would carry huge gradients
        pi.embed.weight[0] = pi.embed.weight.std() * torch.randn(pi.embed.weight.shape[1], generator=g)
    engine, _ = load_model(policy, dtype="float32")
    engine.load_state_dict(pi.state_dict())
    with torch.no_grad():
        for p in engine.parameters():
            p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
    vocab = pi.config.vocab_size
    completions = [list(c) for c in itertools.product(range(vocab), repeat=LENGTH)]
    batch = Batch([[1, 4, 5, 6]] * len(completions), completions)
    advantage = torch.randn(len(completions), generator=g)  # any function of the whole completion
    return pi, engine, batch, advantage


def _expected_gradient(pi, batch: Batch, sampler_logprobs: torch.Tensor, advantage: torch.Tensor, algo: AlgorithmConfig,
                       rollout_logprobs: torch.Tensor, reuse: bool, in_training: bool = False) -> torch.Tensor:
    """E_{y ~ sampler}[grad of the objective] over every completion: the objective is linear in
    each sample's advantage, so weighting advantages by the sampler's probability (times N, undoing
    the token mean) turns the batch's loss into that expectation."""
    n = len(batch)
    rows = [list(r) for r in rollout_logprobs]
    inference = make_targets(batch, torch.zeros(n), n, rows, algo, PARAMS, pi, reuse, max_tokens=1 << 20, in_training=in_training)
    targets = inference.targets
    targets.advantages = advantage * sampler_logprobs.sum(-1).exp() * n
    pi.zero_grad(set_to_none=True)
    lp, _ = completion_logprobs(pi, batch, list(range(n)), PARAMS)
    loss, _ = policy_objective(lp, list(range(n)), targets, algo, n * LENGTH, n, LENGTH)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in pi.parameters()])


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    from tests.rl.helpers import tiny_policy_dir

    pi, engine, batch, advantage = _setup(tiny_policy_dir(tmp_path_factory.mktemp("offpolicy") / "policy"))
    trainer_lp = all_logprobs(pi, batch, PARAMS, 1 << 20)
    engine_lp = all_logprobs(engine, batch, PARAMS, 1 << 20)
    expected_gap = ((trainer_lp - engine_lp).abs().mean(-1) * engine_lp.sum(-1).exp()).sum()
    assert torch.allclose(trainer_lp.sum(-1).exp().sum(), torch.tensor(1.0), atol=1e-4)  # every completion is there
    assert torch.allclose(engine_lp.sum(-1).exp().sum(), torch.tensor(1.0), atol=1e-4)
    assert 0.015 < expected_gap < 0.05
    assert (trainer_lp - engine_lp).sum(-1).exp().max() < 10  # no sequence's ratio reaches tis_sequence's cap
    grad = lambda sampler, algo, reuse, fused=False: _expected_gradient(pi, batch, sampler, advantage, algo, engine_lp, reuse, fused)  # noqa: E731
    return {
        # the old logprobs (and the importance weights) taken in the training forward itself
        "uncorrected_in_training": grad(engine_lp, AlgorithmConfig(old_logprobs="recompute", tis_cap=None), False, True),
        "tis_token_in_training": grad(engine_lp, AlgorithmConfig(old_logprobs="recompute"), False, True),
        "tis_sequence_in_training": grad(engine_lp, AlgorithmConfig(old_logprobs="recompute", tis_level="sequence", tis_cap=10.0), False, True),
        "rollout_in_training": grad(engine_lp, AlgorithmConfig(old_logprobs="rollout"), True, True),
        # sampled by the trainer's own numbers: the on-policy gradient every correction aims at
        "on_policy": _expected_gradient(pi, batch, trainer_lp, advantage, AlgorithmConfig(tis_cap=None), trainer_lp, reuse=True),
        "uncorrected": grad(engine_lp, AlgorithmConfig(old_logprobs="recompute", tis_cap=None), False),
        "tis_token": grad(engine_lp, AlgorithmConfig(old_logprobs="recompute"), False),
        "tis_sequence": grad(engine_lp, AlgorithmConfig(old_logprobs="recompute", tis_level="sequence", tis_cap=10.0), False),
        "rollout": grad(engine_lp, AlgorithmConfig(old_logprobs="rollout"), True),
    }


def _error(gradients, name):
    ref = gradients["on_policy"]
    return ((gradients[name] - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", ["uncorrected", "tis_token", "tis_sequence", "rollout"])
def test_old_logprobs_taken_in_the_training_forward_give_the_recomputed_gradient(gradients, name):
    # One optimizer step per iteration: the trained forward's own detached logprobs stand for the
    # recompute forward's (the same weights; float32 kernels with and without autograd differ in the
    # last bits only), and the importance weights follow from them.
    diff = (gradients[f"{name}_in_training"] - gradients[name]).norm() / gradients[name].norm()
    assert diff < 1e-5


def test_the_precision_gap_biases_the_uncorrected_gradient(gradients):
    assert _error(gradients, "uncorrected") > 0.02


def test_sequence_level_importance_weights_recover_the_on_policy_gradient_exactly(gradients):
    # Unbiased until truncated, and no sequence's ratio reaches the cap of 10 here.
    assert _error(gradients, "tis_sequence") < 1e-4


@pytest.mark.parametrize("name", ["tis_token", "rollout"])
def test_token_level_corrections_reduce_the_bias(gradients, name):
    # Per token, the prefix and the rest of the completion (which the advantage depends on) still
    # come from the engine, so much of the bias remains: 0.022 against 0.027 uncorrected when written
    # (deterministic: no sampling, so the margin only has to cover rounding).
    assert _error(gradients, name) < 0.9 * _error(gradients, "uncorrected")


def test_rollout_logprobs_as_the_behaviour_policy_give_token_tis_where_the_clip_does_not_bind(gradients):
    # The first step's ratio pi / pi_engine is that weight, uncapped; PPO's clip zeroes the gradient
    # of the few tokens whose gap leaves [0.8, 1.2] (more of them as the gap grows).
    diff = (gradients["rollout"] - gradients["tis_token"]).norm() / gradients["tis_token"].norm()
    assert diff < 0.02


def test_old_logprobs_modes_in_the_trainer(tmp_path, policy, monkeypatch):
    import rlhfspec.rl.experience as experience

    recomputed = []
    original = experience.all_logprobs
    monkeypatch.setattr(experience, "all_logprobs", lambda *a, **k: recomputed.append(1) or original(*a, **k))
    cfg = config(tmp_path, policy, **{"train.dtype": "bfloat16", "train.iterations": 2, "algorithm.old_logprobs": "rollout"})
    records = Trainer(cfg, progress=False, log=lambda _: None).train()
    assert recomputed == []  # no inference-stage forward: the engine's logprobs are the old ones
    assert records[0]["rollout_trainer_logprob_gap_max"] > 1e-3  # the gap is still measured at the check
    assert "rollout_trainer_logprob_diff" not in records[1]
    cfg = config(tmp_path, policy, **{"train.dtype": "float32", "train.iterations": 1, "algorithm.old_logprobs": "recompute",
                                      "run.output_dir": tmp_path / "recompute"})
    records = Trainer(cfg, progress=False, log=lambda _: None).train()
    assert records[0]["rollout_trainer_logprob_diff"] < 1e-3  # recomputed although the engine's would have done


@pytest.mark.parametrize("setting, message", [
    ({"algorithm.old_logprobs": "engine"}, "algorithm.old_logprobs 'engine' is not auto, recompute or rollout."),
    ({"algorithm.tis_level": "batch"}, "algorithm.tis_level 'batch' is not token or sequence."),
    ({"algorithm.tis_cap": "0.5"}, "algorithm.tis_cap is 0.5; it must be >= 1"),
    ({"algorithm.old_logprobs": "rollout", "generation.top_p": "0.9"}, "with generation.top_k or top_p the engine samples"),
])
def test_bad_correction_settings_are_one_sentence(tmp_path, policy, setting, message):
    with pytest.raises(RlhfspecError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config(tmp_path, policy, **setting).validate()


