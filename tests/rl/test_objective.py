"""The loss the trainer actually runs (policy_objective with token_weights, over micro-batches of
shuffled mini-batches), the inference stage (make_targets) and the KL conventions, each against a
slow direct reference."""

import math
import random

import pytest
import torch

from rlhfspec import RlhfspecError
from rlhfspec.rl import experience
from rlhfspec.rl.config import AlgorithmConfig, Config
from rlhfspec.rl.config_files import load_config
from rlhfspec.rl.logprobs import Batch
from rlhfspec.rl.objective import Targets, policy_objective

N, T, MAX_LEN = 8, 7, 9


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    old = -torch.rand(N, T, generator=g) * 3
    lp = (old + 0.3 * torch.randn(N, T, generator=g)).clamp(max=-1e-3)
    ref = old + 0.2 * torch.randn(N, T, generator=g)
    ent = torch.rand(N, T, generator=g) * 2
    isw = torch.rand(N, T, generator=g) + 0.5
    adv = torch.randn(N, generator=g)
    return lp, old, ref, ent, isw, adv, mask


def _reference(lp, old, ref, ent, isw, adv, mask, algo: AlgorithmConfig, rows: list[int]) -> float:
    """The mini-batch loss by a loop over sequences and tokens (floats, no tensors)."""
    hi = algo.clip_high if algo.clip_high is not None else algo.clip_low
    per_seq, total, count = [], 0.0, 0
    for i in rows:
        s, n = 0.0, 0
        for t in range(T):
            if not mask[i, t]:
                continue
            rho = math.exp(lp[i, t] - old[i, t])
            a = float(adv[i])
            loss = -min(rho * a, min(max(rho, 1 - algo.clip_low), 1 + hi) * a) * float(isw[i, t])
            if algo.beta and not algo.kl_in_reward:
                log_r = float(ref[i, t] - lp[i, t])
                loss += algo.beta * {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.exp(log_r) - 1 - log_r}[algo.kl_estimator]
            loss -= algo.entropy_coef * float(ent[i, t])
            s, n, total, count = s + loss, n + 1, total + loss, count + 1
        per_seq.append((s, n))
    if algo.aggregation == "token-mean":
        return total / count
    if algo.aggregation == "sequence-mean":
        return sum(s / n for s, n in per_seq) / len(per_seq)
    return total / (len(rows) * MAX_LEN)  # Dr. GRPO: a constant, B x the maximum completion length


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean", "sequence-sum-mean"])
@pytest.mark.parametrize("kl, entropy", [(None, 0.0), ("k3", 0.0), ("k2", 0.01), ("k3", 0.02)])
def test_micro_batched_objective_of_shuffled_mini_batches_equals_the_direct_loss_and_gradient(aggregation, kl, entropy):
    lp, old, ref, ent, isw, adv, mask = _data(3)
    algo = AlgorithmConfig(beta=0.1 if kl else 0.0, kl_in_reward=False, kl_estimator=kl or "k3", aggregation=aggregation,
                           clip_high=0.28, entropy_coef=entropy)
    targets = Targets(mask=mask, old_logprobs=old, advantages=adv, ref_logprobs=ref, is_weights=isw)
    order = list(range(N))
    random.Random(0).shuffle(order)
    for mb in (order[:5], order[5:]):  # two mini-batches of a shuffled iteration
        n_tokens, n_seqs = mask[mb].sum().item(), len(mb)
        want = _reference(lp, old, ref, ent, isw, adv, mask, algo, mb)
        x = lp.clone().requires_grad_(True)
        total = 0.0
        for micro in (m for m in (mb[:2], mb[2:3], mb[3:]) if m):  # uneven micro-batches, each cut to its own width
            width = int(mask[micro].sum(-1).max())
            loss, _ = policy_objective(x[micro, :width], micro, targets, algo, n_tokens, n_seqs, MAX_LEN, ent[micro, :width])
            loss.backward()
            total += loss.item()
        assert total == pytest.approx(want, rel=1e-5, abs=1e-7)
        # The gradient too: finite differences of the reference on a few coordinates.
        for i, t in [(mb[0], 0), (mb[-1], 0), (mb[1], int(mask[mb[1]].sum()) - 1)]:
            bumped = lp.clone()
            bumped[i, t] += 1e-3
            fd = (_reference(bumped, old, ref, ent, isw, adv, mask, algo, mb) - want) / 1e-3
            assert x.grad[i, t].item() == pytest.approx(fd, rel=2e-2, abs=1e-4)


def _patched_logprobs(monkeypatch, tables: dict):
    """make_targets scores with all_logprobs(model, ...); here a model is the name of a table."""
    monkeypatch.setattr(experience, "all_logprobs", lambda model, batch, params, max_tokens: tables[model].clone())


def _batch_and_tables(g_size: int = 4, groups: int = 2):
    n = g_size * groups
    batch = Batch([[1, 2]] * n, [[5, 6, 7][: 1 + i % 3] for i in range(n)])
    mask = batch.mask()
    gen = torch.Generator().manual_seed(1)
    tables = {"policy": -torch.rand(n, mask.shape[1], generator=gen) * mask, "reference": -torch.rand(n, mask.shape[1], generator=gen) * mask}
    return batch, mask, tables


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_kl_in_the_reward_is_k1_summed_over_each_sequence_before_the_group_baseline(monkeypatch, name):
    from rlhfspec.engine.sampling import SamplingParams
    from rlhfspec.rl.advantages import group_advantages, rloo_advantages

    batch, mask, tables = _batch_and_tables()
    _patched_logprobs(monkeypatch, tables)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.2])
    algo = AlgorithmConfig(name=name, beta=0.5, kl_in_reward=True, kl_estimator="k1")
    out = experience.make_targets(batch, rewards, 4, [[0.0]] * 8, algo, SamplingParams(), "policy", False, reference="reference")
    seq_kl = ((tables["policy"] - tables["reference"]) * mask).sum(-1)  # k1 = log pi - log pi_ref
    folded = (rewards - 0.5 * seq_kl).view(2, 4)
    want = group_advantages(folded, "group") if name == "grpo" else rloo_advantages(folded)
    assert torch.allclose(out.targets.advantages, want.reshape(-1), atol=1e-6)
    # ... and with beta 0 the reference changes nothing.
    plain = experience.make_targets(batch, rewards, 4, [[0.0]] * 8, AlgorithmConfig(name=name, beta=0.0, kl_in_reward=True, kl_estimator="k1"),
                                    SamplingParams(), "policy", False, reference="reference")
    base = group_advantages(rewards.view(2, 4), "group") if name == "grpo" else rloo_advantages(rewards.view(2, 4))
    assert torch.allclose(plain.targets.advantages, base.reshape(-1), atol=1e-6)


def test_kl_in_the_loss_leaves_the_advantages_alone_and_ppo_puts_k1_in_every_token_reward(monkeypatch):
    from rlhfspec.engine.sampling import SamplingParams

    batch, mask, tables = _batch_and_tables()
    _patched_logprobs(monkeypatch, tables)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.2])
    with_kl = experience.make_targets(batch, rewards, 4, [[0.0]] * 8, AlgorithmConfig(beta=0.5, kl_in_reward=False, kl_estimator="k3"),
                                      SamplingParams(), "policy", False, reference="reference")
    without = experience.make_targets(batch, rewards, 4, [[0.0]] * 8, AlgorithmConfig(beta=0.0), SamplingParams(), "policy", False)
    assert torch.equal(with_kl.targets.advantages, without.targets.advantages) and with_kl.targets.ref_logprobs is not None
    from rlhfspec.rl.losses import kl_penalised_rewards

    per_token = kl_penalised_rewards(rewards, tables["policy"], tables["reference"], mask, 0.5, "k1")
    last = mask.sum(-1).long() - 1
    for i in range(8):
        for t in range(int(mask[i].sum())):
            k1 = float(tables["policy"][i, t] - tables["reference"][i, t])
            assert per_token[i, t].item() == pytest.approx(-0.5 * k1 + (float(rewards[i]) if t == last[i] else 0.0), abs=1e-6)


def test_a_non_finite_logprob_stops_the_iteration_with_a_sentence(monkeypatch):
    from rlhfspec.engine.sampling import SamplingParams

    batch, mask, tables = _batch_and_tables()
    tables["reference"][3, 0] = float("-inf")
    _patched_logprobs(monkeypatch, tables)
    with pytest.raises(RlhfspecError, match="reference model's logprobs of sample 3, token 0 is -inf"):
        experience.make_targets(batch, torch.zeros(8), 4, [[0.0]] * 8, AlgorithmConfig(beta=0.1, kl_in_reward=False, kl_estimator="k3"),
                                SamplingParams(), "policy", False, reference="reference")


@pytest.mark.parametrize("name, in_reward, estimator", [("grpo", False, "k3"), ("rloo", True, "k1"), ("ppo", True, "k1")])
def test_kl_defaults_follow_each_algorithms_reference(name, in_reward, estimator):
    c = load_config(None, ["--algorithm.name", name, "--generation.num_generations", "2"])
    c.validate()
    assert (c.algorithm.kl_in_reward, c.algorithm.kl_estimator) == (in_reward, estimator)


def test_k1_in_the_loss_is_refused():
    c = Config()
    c.algorithm.beta, c.algorithm.kl_in_reward, c.algorithm.kl_estimator = 0.1, False, "k1"
    with pytest.raises(RlhfspecError, match="zero expected gradient"):
        c.validate()


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_micro_batches_keep_every_ranks_rows_under_the_budget_and_cover_each_sample_once(ranks):
    """Each rank's micro-batches: rows sorted by length, padded to at most max_tokens (one row
    longer than the budget goes alone); the ranks' shares cover every sample once."""
    rng = random.Random(ranks)
    lengths = [(rng.randint(1, 40), rng.randint(0, 90)) for _ in range(61)]
    batch = Batch([[1] * p for p, _ in lengths], [[2] * c for _, c in lengths])
    shares = batch.rank_shares(150, ranks)
    assert len(shares) == ranks and sorted(i for share in shares for g in share for i in g) == list(range(61))
    width = [sum(lengths[i]) for i in range(61)]
    for g in (g for share in shares for g in share):
        assert [width[i] for i in g] == sorted(width[i] for i in g)
        assert len(g) == 1 or max(width[i] for i in g) * len(g) <= 150
