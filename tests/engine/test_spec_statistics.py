"""Statistical losslessness: 20,000 first-three-token sequences from speculative decoding on a tiny
model follow the exact sequence distribution (chi-square, p > 0.001), and a deliberately broken
acceptance rule fails the same test."""

import pytest
import torch

import rlhfspec.engine.verify as spec
from rlhfspec import SamplingParams, generate, load_model
from rlhfspec.engine.sampling import processed_logprobs
from tests.conftest import tiny_hf_model

N = 20_000
PROMPT = [1, 5, 3, 6]
VOCAB = 8
SETTINGS = [
    SamplingParams(temperature=1.0, max_new_tokens=3, ignore_eos=True),
    SamplingParams(temperature=0.6, top_k=5, max_new_tokens=3, ignore_eos=True),
    SamplingParams(temperature=1.4, top_p=0.7, max_new_tokens=3, ignore_eos=True),
]


def exact_joint(hf, params) -> torch.Tensor:
    """P(t1, t2, t3) = p(t1) p(t2|t1) p(t3|t1,t2) under the processed distribution: [V, V, V]."""
    v = VOCAB
    pairs = torch.tensor([[a, b] for a in range(v) for b in range(v)])
    seqs = torch.cat((torch.tensor(PROMPT).expand(len(pairs), -1), pairs), dim=1)
    with torch.no_grad():
        logits = hf(seqs).logits.float()
    p1 = processed_logprobs(logits[:1, len(PROMPT) - 1], params).exp()[0]
    p2 = processed_logprobs(logits[::v, len(PROMPT)], params).exp()  # [v, v]: row t1
    p3 = processed_logprobs(logits[:, len(PROMPT) + 1], params).exp().view(v, v, v)
    return (p1[:, None, None] * p2[:, :, None] * p3).double()


def chi_square_p_value(samples: list[list[int]], joint: torch.Tensor) -> float:
    counts = torch.zeros(joint.numel(), dtype=torch.float64)
    for s in samples:
        counts[(s[0] * VOCAB + s[1]) * VOCAB + s[2]] += 1
    expected = joint.flatten() * len(samples)
    big = expected >= 5
    obs = torch.cat((counts[big], counts[~big].sum()[None]))
    exp = torch.cat((expected[big], expected[~big].sum()[None]))
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    overrides = dict(vocab_size=VOCAB, initializer_range=0.6)
    path = tmp_path_factory.mktemp("policy")
    tiny_hf_model("llama", seed=0, **overrides).save_pretrained(path)
    dpath = tmp_path_factory.mktemp("draft")
    tiny_hf_model("llama", seed=3, num_hidden_layers=1, **overrides).save_pretrained(dpath)
    policy, _ = load_model(path, dtype="float32")
    draft, _ = load_model(dpath, dtype="float32")
    return policy, draft, tiny_hf_model("llama", seed=0, **overrides)


def _sample(policy, params, seed, **kw):
    outs = generate(policy, [PROMPT] * N, params, seed=seed, batch_size=N, **kw)
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_speculative_sequences_follow_the_exact_distribution(models, setting):
    policy, draft, hf = models
    params = SETTINGS[setting]
    joint = exact_joint(hf, params)
    assert chi_square_p_value(_sample(policy, params, 11), joint) > 0.001
    stats = []
    spec_samples = _sample(policy, params, 12, drafter=draft, num_draft_tokens=2, instance_stats=stats)
    assert 0.05 < stats[0].acceptance < 0.95  # the draft disagrees often enough to test rejections
    assert chi_square_p_value(spec_samples, joint) > 0.001
    assert chi_square_p_value(_sample(policy, params, 13, drafter="ngram", num_draft_tokens=2), joint) > 0.001


def test_a_broken_acceptance_rule_fails_the_same_test(models, monkeypatch):
    policy, draft, hf = models
    params = SETTINGS[0]
    monkeypatch.setattr(spec, "acceptance_probability", lambda p, q, d: torch.ones(len(d), dtype=p.dtype))
    assert chi_square_p_value(_sample(policy, params, 12, drafter=draft, num_draft_tokens=2), exact_joint(hf, params)) < 0.001
