"""The processed distribution, inverse-CDF sampling and the keyed random numbers."""

import pytest
import torch

from rlhfspec import RlhfspecError, SamplingParams
from rlhfspec.engine.sampling import keyed_uniforms, keyed_uniforms_reference, processed_logprobs, sample, seed_tensor


def test_keyed_uniforms_equal_the_plain_integer_reference():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2**40, (50,), generator=g)
    pos = torch.randint(0, 10_000, (50,), generator=g)
    for seed in (0, 1, 12345, 2**63 + 7):
        for purpose in (0, 1, 2, 3):
            got = keyed_uniforms(seed, ids, pos, purpose).tolist()
            want = [keyed_uniforms_reference(seed, int(i), int(p), purpose) for i, p in zip(ids, pos)]
            assert got == want
    seeds = seed_tensor([3, 2**64 - 1, 5], "cpu")
    got = keyed_uniforms(seeds, ids[:3], pos[:3], 0).tolist()
    assert got == [keyed_uniforms_reference(s, int(i), int(p), 0) for s, i, p in zip([3, 2**64 - 1, 5], ids[:3], pos[:3])]


def test_keyed_uniforms_look_uniform_and_independent_across_keys():
    u = keyed_uniforms(0, torch.arange(200_000), torch.zeros(200_000, dtype=torch.long), 0)
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    v = keyed_uniforms(0, torch.arange(200_000), torch.ones(200_000, dtype=torch.long), 0)
    assert abs(torch.corrcoef(torch.stack((u, v)))[0, 1].item()) < 0.01


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.7), SamplingParams(top_k=5), SamplingParams(top_p=0.8), SamplingParams(temperature=1.3, top_k=20, top_p=0.6)],
)
def test_processed_distribution_equals_transformers_warpers(params):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    x = logits.clone()
    if params.temperature != 1.0:
        x = TemperatureLogitsWarper(params.temperature)(None, x)
    if params.top_k:
        x = TopKLogitsWarper(params.top_k)(None, x)
    if params.top_p < 1:
        x = TopPLogitsWarper(params.top_p)(None, x)
    want = torch.log_softmax(x, -1)
    got = processed_logprobs(logits, params)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], atol=1e-6)


def test_inverse_cdf_sampling_reproduces_the_distribution_and_never_picks_zero_probability_tokens():
    p = torch.tensor([[0.0, 0.1, 0.0, 0.45, 0.25, 0.2, 0.0]])
    n = 20_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    u = torch.cat((u, torch.tensor([0.0, 1 - 2.0**-48], dtype=torch.float64)))
    tokens = sample(p.log().expand(len(u), -1), u, greedy=False)
    counts = torch.bincount(tokens, minlength=7).double()
    assert counts[[0, 2, 6]].sum() == 0
    assert torch.allclose(counts / counts.sum(), p[0].double(), atol=2 / n)


def test_greedy_takes_the_argmax():
    lp = torch.log_softmax(torch.randn(4, 30), -1)
    assert torch.equal(sample(lp, torch.zeros(4), greedy=True), lp.argmax(-1))


@pytest.mark.parametrize(
    "kwargs, culprit",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens")],
)
def test_bad_sampling_params_are_clear_errors(kwargs, culprit):
    with pytest.raises(RlhfspecError, match=culprit):
        SamplingParams(**kwargs)
