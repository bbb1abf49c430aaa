"""Advantage estimators and losses against direct, slow references (plain Python loops)."""

import math
import random

import pytest
import torch

from rlhfspec.rl.advantages import gae, group_advantages, rloo_advantages, whiten
from rlhfspec.rl.losses import aggregate, clipped_surrogate, clipped_value_loss, kl_estimate, kl_penalised_rewards, truncated_is_weights


def rand(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ragged_mask(b, t, seed=0):
    rng = random.Random(seed)
    lens = [rng.randint(1, t) for _ in range(b)]
    return torch.tensor([[1.0] * n + [0.0] * (t - n) for n in lens], dtype=torch.float64)


def test_group_advantages_match_the_formula():
    r = rand((5, 8))
    got = group_advantages(r)
    for g in range(5):
        xs = r[g].tolist()
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        for i, x in enumerate(xs):
            assert got[g, i].item() == pytest.approx((x - mean) / (std + 1e-4))
    assert torch.allclose(got.sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(group_advantages(r, scale="none"), r - r.mean(1, keepdim=True))
    flat = r.flatten().tolist()
    m = sum(flat) / len(flat)
    batch_std = math.sqrt(sum((x - m) ** 2 for x in flat) / (len(flat) - 1))
    assert torch.allclose(group_advantages(r, scale="batch"), (r - r.mean(1, keepdim=True)) / (batch_std + 1e-4))


def test_equal_rewards_in_a_group_give_zero_advantage():
    assert torch.equal(group_advantages(torch.ones(2, 4)), torch.zeros(2, 4))


def test_rloo_is_leave_one_out():
    r = rand((3, 6), seed=1)
    got = rloo_advantages(r)
    for g in range(3):
        for i in range(6):
            others = [r[g, j].item() for j in range(6) if j != i]
            assert got[g, i].item() == pytest.approx(r[g, i].item() - sum(others) / len(others))


def test_gae_matches_the_recursive_definition():
    rewards, values, mask = rand((4, 7), 2), rand((4, 7), 3), ragged_mask(4, 7, 4)
    gamma, lam = 0.99, 0.9
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(4):
        n = int(mask[b].sum())
        for t in range(7):
            if t >= n:
                assert adv[b, t] == 0 and ret[b, t] == 0
                continue
            want = 0.0
            for k in range(t, n):  # A_t = sum_k (gamma lam)^(k-t) delta_k
                v_next = values[b, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[b, k].item() + gamma * v_next - values[b, k].item()
                want += (gamma * lam) ** (k - t) * delta
            assert adv[b, t].item() == pytest.approx(want)
            assert ret[b, t].item() == pytest.approx(want + values[b, t].item())


def test_whiten_gives_zero_mean_unit_variance_over_the_mask():
    x, mask = rand((3, 9), 5) * 4 + 2, ragged_mask(3, 9, 6)
    w = whiten(x, mask)
    vals = [w[b, t].item() for b in range(3) for t in range(9) if mask[b, t]]
    mean = sum(vals) / len(vals)
    assert mean == pytest.approx(0, abs=1e-9)
    assert sum((v - mean) ** 2 for v in vals) / len(vals) == pytest.approx(1, rel=1e-6)


def _reference_policy_loss(lp, old, adv, mask, lo, hi, how):
    per_seq, total, count = [], 0.0, 0
    for b in range(len(lp)):
        s, n = 0.0, 0
        for t in range(len(lp[0])):
            if not mask[b][t]:
                continue
            rho = math.exp(lp[b][t] - old[b][t])
            a = adv[b]
            loss = -min(rho * a, min(max(rho, 1 - lo), 1 + hi) * a)
            s, n, total, count = s + loss, n + 1, total + loss, count + 1
        per_seq.append((s, n))
    if how == "token-mean":
        return total / count
    if how == "sequence-mean":
        return sum(s / n for s, n in per_seq) / len(per_seq)
    return sum(s for s, _ in per_seq) / (len(per_seq) * len(lp[0]))  # Dr. GRPO: / (B * max length)


@pytest.mark.parametrize("how", ["token-mean", "sequence-mean", "sequence-sum-mean"])
@pytest.mark.parametrize("clip_high", [None, 0.28])
def test_aggregated_clipped_surrogate_matches_the_reference(how, clip_high):
    lp, old = rand((5, 6), 7) * 0.3, rand((5, 6), 8) * 0.3
    adv, mask = rand((5,), 9), ragged_mask(5, 6, 10)
    per_token, clipped = clipped_surrogate(lp, old, adv, 0.2, clip_high)
    want = _reference_policy_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, clip_high or 0.2, how)
    assert aggregate(per_token, mask, how).item() == pytest.approx(want)
    assert 0 < (clipped & mask.bool()).sum() < mask.sum()


def test_policy_gradient_at_ratio_one_is_advantage_weighted_logprob_gradient():
    lp = rand((2, 3), 11).requires_grad_(True)
    adv, mask = torch.tensor([1.5, -0.5], dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    aggregate(clipped_surrogate(lp, lp.detach(), adv)[0], mask, "token-mean").backward()
    assert torch.allclose(lp.grad, -adv[:, None].expand(2, 3) / 6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators(kind):
    lp, ref = rand((4, 5), 12), rand((4, 5), 13)
    got = kl_estimate(lp, ref, kind)
    for b in range(4):
        for t in range(5):
            log_r = ref[b, t].item() - lp[b, t].item()
            want = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.exp(log_r) - 1 - log_r}[kind]
            assert got[b, t].item() == pytest.approx(want)


def test_k3_is_an_unbiased_kl_estimate():
    # Exact expectation over a small categorical: E_p[k3] = KL(p || q).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    expectation = (p * kl_estimate(p.log(), q.log(), "k3")).sum()
    assert expectation.item() == pytest.approx((p * (p / q).log()).sum().item())


def test_value_loss_matches_the_reference():
    v, old, ret, mask = rand((3, 4), 14), rand((3, 4), 15), rand((3, 4), 16), ragged_mask(3, 4, 17)
    got = clipped_value_loss(v, old, ret, mask, clip=0.2)
    terms = []
    for b in range(3):
        for t in range(4):
            if mask[b, t]:
                vc = old[b, t].item() + max(-0.2, min(0.2, v[b, t].item() - old[b, t].item()))
                terms.append(0.5 * max((v[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2))
    assert got.item() == pytest.approx(sum(terms) / len(terms))


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    lp, ref, mask = rand((2, 5), 18), rand((2, 5), 19), ragged_mask(2, 5, 20)
    scores = torch.tensor([1.0, -2.0], dtype=torch.float64)
    got = kl_penalised_rewards(scores, lp, ref, mask, beta=0.1)
    for b in range(2):
        n = int(mask[b].sum())
        for t in range(5):
            want = 0.0 if t >= n else -0.1 * (lp[b, t] - ref[b, t]).item() + (scores[b].item() if t == n - 1 else 0.0)
            assert got[b, t].item() == pytest.approx(want)


def test_truncated_importance_weights_and_aggregation_errors():
    w = truncated_is_weights(torch.tensor([0.0, 2.0]), torch.tensor([0.5, 0.0]), cap=2.0)
    assert w.tolist() == pytest.approx([math.exp(-0.5), 2.0])
    trainer, rollout = torch.tensor([[0.0, -0.3, 9.0], [-1.0, -1.0, -1.0]]), torch.tensor([[-0.2, -0.4, 0.0], [-1.5, -1.5, -1.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = truncated_is_weights(trainer, rollout, 2.0, mask, "sequence")  # masked tokens count for nothing
    assert torch.allclose(w, torch.tensor([[math.exp(0.3), math.exp(0.3), 0.0], [2.0, 2.0, 2.0]]))
    per_token = truncated_is_weights(trainer, rollout, 2.0, mask)
    assert torch.allclose(per_token, torch.tensor([[math.exp(0.2), math.exp(0.1), 0.0], [math.exp(0.5)] * 3]))
    with pytest.raises(ValueError):
        truncated_is_weights(trainer, rollout, 2.0, mask, "batch")
    with pytest.raises(ValueError):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean-of-nothing")
