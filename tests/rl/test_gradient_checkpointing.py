"""train.gradient_checkpointing (each decoder layer recomputed in the backward pass) and
train.logits_chunk (the output layer's logits computed a piece of rows at a time, and again in the
backward pass): each keeps less for the backward pass and leaves the gradients (and so the updates)
those of the plain forward, in float32 and under bfloat16 autocast, with and without prompt
sharing, an entropy bonus included; forwards without autograd do not change."""

import pytest
import torch

from rlhfspec.models.loader import load_model
from rlhfspec.rl.config import Config
from rlhfspec.rl.learner import Learner, score_params
from rlhfspec.rl.logprobs import Batch, all_logprobs, completion_logprobs
from rlhfspec.rl.objective import Targets
from tests.rl.helpers import rl_config, tiny_policy_dir

# A recomputed layer runs the same kernels on the same inputs, so the gradients normally come out
# bitwise equal (the e2e bench's updates on the default job were); the tolerance only allows a
# library that picks another algorithm on a second call.
GRADIENTS = dict(rtol=1e-5, atol=1e-7)
# The output layer in pieces adds its weight gradient up piece by piece and runs smaller products,
# which rounds otherwise: measured, at most 6e-7 of a parameter's largest gradient in float32 and
# 0.9% under bf16 autocast (bf16 products), where the layers' gradients stayed equal.
PIECES = {False: 1e-5, True: 2e-2}
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


def _gradients(model, batch: Batch, checkpointing: bool, autocast: bool, chunk: int | None = None) -> tuple[list[torch.Tensor], int]:
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
            lp, mask, ent = completion_logprobs(model, batch, list(range(len(batch))), SCORING, entropy=True, entropy_grad=True,
                                                  logits_chunk=chunk)
    loss = (lp * mask * weights[: lp.shape[1]]).sum() - 0.1 * (ent * mask).sum()  # an entropy bonus reads every logit
    loss.backward()
    model.checkpointing = False
    return [p.grad.clone() for p in model.parameters()], kept[0]


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("layers, chunk", [(True, None), (False, 5), (True, 5)], ids=["layers", "logits", "both"])
def test_recomputing_gives_the_same_gradients_and_keeps_less(policy, share, autocast, layers, chunk):
    model = load_model(policy, dtype="float32", tokenizer=False)[0].train().requires_grad_(True)
    batch = _batch(model, share)
    plain, plain_kept = _gradients(model, batch, False, autocast)
    recomputed, kept = _gradients(model, batch, layers, autocast, chunk)
    for a, b in zip(plain, recomputed):
        if chunk:
            torch.testing.assert_close(b, a, rtol=0, atol=PIECES[autocast] * a.abs().max().item())
        else:
            torch.testing.assert_close(b, a, **GRADIENTS)
    logprobs = sum(len(c) for c in batch.completions) * model.config.vocab_size * 4  # [rows, vocabulary] float32
    # The tiny model's 2 layers: recomputed, what is kept drops to each layer's input and the output
    # layer's share; in pieces, at least one [rows, vocabulary] tensor is no longer kept.
    limit = {"layers": 0.7 * plain_kept, "logits": plain_kept - logprobs, "both": 0.5 * plain_kept}
    assert kept <= limit["both" if layers and chunk else "layers" if layers else "logits"]


def test_forwards_without_autograd_are_untouched(policy):
    model = load_model(policy, dtype="float32", tokenizer=False)[0]
    batch = _batch(model, True)
    plain = all_logprobs(model, batch, SCORING, 1 << 20)
    model.checkpointing = True
    assert torch.equal(all_logprobs(model, batch, SCORING, 1 << 20), plain)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("setting", [{"train.gradient_checkpointing": True}, {"train.logits_chunk": 3}])
def test_the_learner_steps_alike_with_and_without_it(tmp_path, policy, setting, dtype):
    """Two optimizer steps over micro-batches of a few rows, from the same weights, in float32 and
    under bf16 autocast (the backward pass, and so the recompute, inside the learner's autocast
    region): the same losses, gradient norms and updated weights."""
    out = {}
    for flag in (False, True):
        c = _config(tmp_path / str(flag), policy, **{"train.dtype": dtype, **(setting if flag else {})})
        model = load_model(c.model.policy, dtype="float32", tokenizer=False)[0].train().requires_grad_(True)
        learner = Learner(c, model)
        assert model.checkpointing is c.train.gradient_checkpointing
        batch = _batch(model, True)
        old = all_logprobs(model, batch, score_params(c), 1 << 20)
        stats = learner.optimize(batch, Targets(batch.mask(), old, torch.tensor([1.0, -0.5, 0.2, -0.7, 0.9, -0.1, 0.3, -1.1])), 0)
        out[flag] = stats, [p.detach().clone() for p in model.parameters()]
    (a, wa), (b, wb) = out[False], out[True]
    # The pieces' smaller products round otherwise (under bf16 autocast, measured: loss 4e-5 and
    # gradient norm 3.5e-4 apart; in float32 to float32 rounding), and AdamW's first steps, which
    # divide a gradient by its own size, turn that into up to a whole step (lr = 1e-3) where a
    # gradient is nearly zero (measured 9.9e-4 under bf16; in float32 1.2e-5 at 2 of 16,384 weights
    # of one tensor, once the forward's shapes changed). So with pieces a weight may move by up to
    # two steps; in float32 all but a few weights still come out within 1e-6.
    pieces, bf16 = "train.logits_chunk" in setting, dtype == "bfloat16"
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4 if pieces and bf16 else 1e-6)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-3 if pieces and bf16 else 1e-5)
    for x, y in zip(wa, wb):
        torch.testing.assert_close(y, x, rtol=0, atol=2e-3 if pieces else 1e-6)
        if pieces and not bf16:
            assert ((y - x).abs() > 1e-6).float().mean() <= 1e-3
