"""train.skip_zero_advantage: samples whose advantage is zero get no forward or backward, and the
updates are those of training on every sample (to float32 summation order), a step with no sample
left included; anything else in the loss that reads those samples turns the skipping off."""

import pytest
import torch

from rlhfspec.models.loader import load_model
from rlhfspec.rl.learner import Learner, load_critic, score_params
from rlhfspec.rl.logprobs import Batch, all_logprobs
from rlhfspec.rl.objective import Targets
from tests.rl.helpers import rl_config, tiny_policy_dir

# Skipping changes which samples share a micro-batch, so the gradients add up in another order: the
# first step's gradients differ by about 2e-9 of their norm, measured; AdamW's first steps divide
# each gradient by its own size, which makes the weights after 4 steps at lr 1e-3 differ by up to
# 5.9e-6 (a weight whose gradient is nearly zero), measured, against moves of 5e-3.
GRADIENTS = 1e-5
PARAMETERS = 2e-5
STATISTICS = dict(rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_policy_dir(tmp_path_factory.mktemp("skip") / "policy")


def _config(tmp_path, policy, **overrides):
    c = rl_config(tmp_path, policy, **{"train.learning_rate": 1e-3, "train.dtype": "float32", "train.mini_batches": 2,
                                       "train.epochs": 2, "train.micro_batch_tokens": 40, **overrides})
    c.validate()
    return c


def _experience(c, model, advantages: list[float]) -> tuple[Batch, Targets]:
    """Two prompts' groups of ragged completions with the given advantages, old logprobs the policy's."""
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size - 4
    prompts = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in (6, 4)]
    n = len(advantages)
    batch = Batch([prompts[i * 2 // n] for i in range(n)],
                  [torch.randint(4, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)], True)
    old = all_logprobs(model, batch, score_params(c), 1 << 20)
    return batch, Targets(batch.mask(), old, torch.tensor(advantages))


def _train(c, steps: list[list[float]]):
    """A fresh policy's learner through one optimize per advantage list; its records and weights."""
    model = load_model(c.model.policy, dtype="float32", tokenizer=False)[0].train().requires_grad_(True)
    learner = Learner(c, model)
    records, grads = [], None
    for it, advantages in enumerate(steps):
        records.append(learner.optimize(*_experience(c, model, advantages), it))
        if it == 0 and c.train.mini_batches == c.train.epochs == 1:  # the first step's gradient, at the initial weights
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return records, [p.detach().clone() for p in model.parameters()], grads


# The first group all scored alike (no signal), the second did not; then an iteration with no signal at all.
STEPS = [[0.0] * 4 + [1.2, -0.4, -0.8, 0.0], [0.0] * 8]


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean"])
def test_skipping_zero_advantage_samples_makes_the_same_updates(tmp_path, policy, aggregation):
    """The normalisation counts the skipped samples' tokens (token-mean) and sequences (sequence-mean)."""
    full, full_weights, _ = _train(_config(tmp_path / "full", policy, **{"train.skip_zero_advantage": False,
                                                                        "algorithm.aggregation": aggregation}), STEPS)
    skip, skip_weights, _ = _train(_config(tmp_path / "skip", policy, **{"algorithm.aggregation": aggregation}), STEPS)
    assert [r["skipped_samples"] for r in skip] == [5, 8] and [r["skipped_samples"] for r in full] == [0, 0]
    assert skip[0]["train_tokens"] < full[0]["train_tokens"] and skip[1]["train_tokens"] == 0
    for a, b in zip(full, skip):
        for key in ("loss", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], **STATISTICS)
    assert full[0]["grad_norm"] > 0 and full[1]["grad_norm"] == skip[1]["grad_norm"] == 0
    assert "entropy" in skip[0] and "entropy" not in skip[1]  # over the trained samples: none in the second
    initial = load_model(policy, dtype="float32", tokenizer=False)[0].parameters()
    moved = min((a - b).abs().max().item() for a, b in zip(full_weights, initial))
    assert max((a - b).abs().max().item() for a, b in zip(full_weights, skip_weights)) < PARAMETERS < moved


def test_one_step_gradient_and_a_step_with_every_sample_skipped(tmp_path, policy):
    """One step over all samples: the same gradient. Then AdamW moves the weights on zero gradients
    (its first moment): so must a step whose samples all had zero advantage, as training on them would."""
    one = {"train.mini_batches": 1, "train.epochs": 1}
    _, full_weights, full = _train(_config(tmp_path / "full", policy, **{"train.skip_zero_advantage": False, **one}), STEPS)
    records, skip_weights, skip = _train(_config(tmp_path / "skip", policy, **one), STEPS)
    assert full.norm() > 0 and (skip - full).norm() <= GRADIENTS * full.norm()
    after_first = _train(_config(tmp_path / "first", policy, **one), STEPS[:1])[1]
    assert records[1]["skipped_samples"] == 8 and records[1]["train_tokens"] == 0
    assert min((a - b).abs().max().item() for a, b in zip(after_first, skip_weights)) > 0  # every weight moved again
    assert max((a - b).abs().max().item() for a, b in zip(full_weights, skip_weights)) < PARAMETERS


@pytest.mark.parametrize("extra", [{"algorithm.entropy_coef": 0.01}, {"algorithm.beta": 0.05, "algorithm.kl_in_reward": False},
                                   {"algorithm.name": "ppo"}])
def test_a_loss_term_that_reads_every_sample_turns_skipping_off(tmp_path, policy, extra):
    c = _config(tmp_path, policy, **extra)
    model = load_model(c.model.policy, dtype="float32", tokenizer=False)[0]
    assert not Learner(c, model, critic=load_critic(c) if c.algorithm.name == "ppo" else None).skips_flat
    assert Learner(_config(tmp_path, policy, **{"algorithm.beta": 0.05, "algorithm.kl_in_reward": True}), model).skips_flat
