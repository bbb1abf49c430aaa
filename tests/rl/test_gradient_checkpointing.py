"""train.gradient_checkpointing: each decoder layer's activations are recomputed in the backward
pass instead of kept, which keeps less for the backward pass and leaves the gradients (and so the
updates) those of the plain forward, in float32 and under bfloat16 autocast, with and without
prompt sharing; forwards without autograd do not change."""

import pytest
import torch

from rlhfspec.models.loader import load_model
from rlhfspec.rl.config import Config
from rlhfspec.rl.learner import Learner, score_params
from rlhfspec.rl.logprobs import Batch, all_logprobs, completion_logprobs
from rlhfspec.rl.objective import Targets
from tests.rl.helpers import rl_config, tiny_policy_dir

# The recomputed layer runs the same kernels on the same inputs, so the gradients normally come out
# bitwise equal; the tolerance only allows a library that picks another algorithm on a second call.
GRADIENTS = dict(rtol=1e-5, atol=1e-7)
SCORING = score_params(Config())


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_policy_dir(tmp_path_factory.mktemp("checkpointing") / "policy")


def _config(tmp_path, policy, **overrides):
    c = rl_config(tmp_path, policy, **{"train.learning_rate": 1e-3, "train.dtype": "float32", "train.mini_batches": 2,
                                       "train.micro_batch_tokens": 40, **overrides})
    c.validate()
    return c


def _batch(model, share: bool) -> Batch:
    g = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size - 4
    prompts = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in (7, 5)]
    return Batch([prompts[i // 4] for i in range(8)],
                 [torch.randint(4, vocab, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist() for _ in range(8)], share)


def _gradients(model, batch: Batch, checkpointing: bool, autocast: bool) -> tuple[list[torch.Tensor], int]:
    """The gradient of a logprob-weighted sum over every completion token, and the bytes the
    forward kept for the backward pass."""
    model.checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    kept = [0]

    def pack(t):
        kept[0] += t.numel() * t.element_size()
        return t

    weights = torch.linspace(-1, 1, 40)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp, mask = completion_logprobs(model, batch, list(range(len(batch))), SCORING)
    loss = (lp * mask * weights[: lp.shape[1]]).sum()
    loss.backward()
    model.checkpointing = False
    return [p.grad.clone() for p in model.parameters()], kept[0]


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_recomputed_layers_give_the_same_gradients_and_keep_less(policy, share, autocast):
    model = load_model(policy, dtype="float32", tokenizer=False)[0].train().requires_grad_(True)
    batch = _batch(model, share)
    plain, plain_kept = _gradients(model, batch, False, autocast)
    recomputed, recomputed_kept = _gradients(model, batch, True, autocast)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(b, a, **GRADIENTS)
    # The tiny model's 2 layers: what is kept drops to each layer's input and the output layer's share.
    assert recomputed_kept < 0.7 * plain_kept


def test_forwards_without_autograd_are_untouched(policy):
    model = load_model(policy, dtype="float32", tokenizer=False)[0]
    batch = _batch(model, True)
    plain = all_logprobs(model, batch, SCORING, 1 << 20)
    model.checkpointing = True
    assert torch.equal(all_logprobs(model, batch, SCORING, 1 << 20), plain)


def test_the_learner_steps_alike_with_and_without_it(tmp_path, policy):
    """Two optimizer steps over micro-batches of a few rows, from the same weights: the same losses,
    gradient norms and updated weights."""
    out = {}
    for flag in (False, True):
        c = _config(tmp_path / str(flag), policy, **{"train.gradient_checkpointing": flag})
        model = load_model(c.model.policy, dtype="float32", tokenizer=False)[0].train().requires_grad_(True)
        learner = Learner(c, model)
        assert model.checkpointing is flag
        batch = _batch(model, True)
        old = all_logprobs(model, batch, score_params(c), 1 << 20)
        stats = learner.optimize(batch, Targets(batch.mask(), old, torch.tensor([1.0, -0.5, 0.2, -0.7, 0.9, -0.1, 0.3, -1.1])), 0)
        out[flag] = stats, [p.detach().clone() for p in model.parameters()]
    (a, wa), (b, wb) = out[False], out[True]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for x, y in zip(wa, wb):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
