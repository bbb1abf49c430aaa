"""train.share_prompts: the trainer's forwards compute each prompt once for its samples. The logprobs,
entropies, values and gradients equal those of a row per sample up to float32 rounding, every sample is
trained once, and each forward stays within train.micro_batch_tokens."""

import random

import pytest
import torch

from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.models.loader import load_model
from rlhfspec.rl.logprobs import Batch, completion_logprobs, values_at
from rlhfspec.rl.trainer import Trainer
from tests.rl.test_trainer import config

PARAMS = SamplingParams(temperature=0.7)


def _batch(vocab: int, share: bool, seed: int = 0) -> Batch:
    """3 prompts of different lengths x 4 samples of different lengths, interleaved as a shuffle leaves them."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(n)] for n in (5, 9, 3)]
    rows = [(p, [rng.randrange(1, vocab) for _ in range(rng.randint(1, 12))]) for p in prompts for _ in range(4)]
    rng.shuffle(rows)
    return Batch([p for p, _ in rows], [c for _, c in rows], share)


def _logprobs_and_grads(model, batch: Batch, max_tokens: int):
    model.zero_grad(set_to_none=True)
    out = torch.zeros(len(batch), 12)
    ent = torch.zeros(len(batch), 12)
    total = 0
    for idx in batch.micro_batches(max_tokens):
        lp, mask, h = completion_logprobs(model, batch, idx, PARAMS, entropy=True)
        (lp * mask * torch.arange(1.0, 1.0 + mask.shape[1])).sum().backward()  # a loss that weighs every position differently
        out[idx, : lp.shape[1]] = lp.detach()
        ent[idx, : h.shape[1]] = h
        total += len(idx)
    assert total == len(batch)
    return out, ent, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("max_tokens", [1 << 20, 24])
def test_shared_prompts_give_the_logprobs_entropies_and_gradients_of_a_row_per_sample(policy, max_tokens):
    model, _ = load_model(policy, dtype="float32")
    model.train().requires_grad_(True)
    vocab = model.config.vocab_size
    plain_lp, plain_ent, plain_grad = _logprobs_and_grads(model, _batch(vocab, False), max_tokens)
    shared = _batch(vocab, True)
    if max_tokens == 24:  # a prompt's samples spread over several rows, as a long group's do
        assert len(shared.units(max_tokens)) > 3
    shared_lp, shared_ent, shared_grad = _logprobs_and_grads(model, shared, max_tokens)
    assert plain_lp.abs().sum() > 0 and plain_grad.norm() > 0
    torch.testing.assert_close(shared_lp, plain_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared_ent, plain_ent, rtol=0, atol=1e-5)
    assert (shared_grad - plain_grad).norm() <= 1e-5 * plain_grad.norm()  # the gradient as a whole, to float32 rounding
    # A prompt's samples that do not sit next to each other each get their own row, with the same numbers.
    order = list(range(len(shared)))
    lp, _ = completion_logprobs(model, shared, order, PARAMS)
    torch.testing.assert_close(lp.detach(), plain_lp[:, : lp.shape[1]], rtol=0, atol=1e-5)


def test_shared_prompts_under_bfloat16_autocast_stay_within_its_rounding(policy):
    """The bf16 trainer's attention (plain products on the CPU) with prompts and completions of different lengths."""
    model, _ = load_model(policy, dtype="float32")
    plain, shared = _batch(model.config.vocab_size, False), _batch(model.config.vocab_size, True)
    idx = shared.micro_batches(1 << 20)[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, mask = completion_logprobs(model, shared, idx, PARAMS)
        b, _ = completion_logprobs(model, plain, idx, PARAMS)
    exact, _ = completion_logprobs(model, plain, idx, PARAMS)
    assert ((a - exact).abs() * mask).max() <= 2 * ((b - exact).abs() * mask).max() + 1e-3


def test_a_critic_reads_the_same_values_from_shared_rows(policy):
    model, _ = load_model(policy, dtype="float32")
    head = torch.randn(model.config.hidden_size, 1)
    plain, shared = _batch(model.config.vocab_size, False), _batch(model.config.vocab_size, True)
    with torch.no_grad():
        for idx in shared.micro_batches(1 << 20):
            torch.testing.assert_close(values_at(model, head, shared, idx), values_at(model, head, plain, idx), rtol=0, atol=1e-4)


def test_the_bands_take_the_plain_products_only_when_all_their_scores_fit_the_cap(policy, monkeypatch):
    """Under bf16 autocast on the CPU an attention keeping at most MATH_ATTENTION_ELEMENTS scores
    runs as plain products (which keep them for the backward pass); the completions' bands count
    together, as the one call they replace did: 24 completions of 20 tokens after a 10-token prompt
    are 3 bands of 8 x 20 x 30 scores a head, each under the cap set here and all three over it."""
    from rlhfspec.models import attention

    model, _ = load_model(policy, dtype="float32")
    heads, layers = model.config.num_heads, model.config.num_layers
    rng = random.Random(0)
    prompt = [rng.randrange(1, model.config.vocab_size) for _ in range(10)]
    batch = Batch([prompt] * 24, [[rng.randrange(1, model.config.vocab_size) for _ in range(20)] for _ in range(24)], True)
    monkeypatch.setattr(attention, "MATH_ATTENTION_ELEMENTS", 2 * 8 * 20 * 30 * heads)
    plain = []
    math = attention.DenseAttention._math
    monkeypatch.setattr(attention.DenseAttention, "_math", lambda self, q, k, v: plain.append(q.shape[0]) or math(self, q, k, v))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        completion_logprobs(model, batch, list(range(24)), PARAMS)
    assert plain == [1] * layers  # the prompt's attention only, once a layer


def test_a_completions_last_token_is_left_out_of_the_forward(policy):
    """No logprob reads a completion's last hidden state and no token sees it, so the forward runs
    the distinct prompts and each completion but its last token (and the logprobs stay a row per
    sample's: the test above)."""
    model, _ = load_model(policy, dtype="float32")
    shared = _batch(model.config.vocab_size, True)
    idx = shared.micro_batches(1 << 20)[0]
    ran = []
    hook = model.register_forward_pre_hook(lambda module, args: ran.append(args[0].numel()))
    try:
        with torch.no_grad():
            completion_logprobs(model, shared, idx, PARAMS)
    finally:
        hook.remove()
    prompts = {tuple(shared.prompts[i]) for i in idx}
    assert ran == [sum(map(len, prompts)) + sum(len(shared.completions[i]) - 1 for i in idx)] == [shared.forward_tokens(idx)]


def _default_job_batch(seed: int, live: float = 1.0) -> Batch:
    """The default job's shape: 8 prompts of 50-70 tokens x 8 completions of up to 128; with
    live < 1 some groups left out, as train.skip_zero_advantage leaves a group that scored alike."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(50) for _ in range(rng.randint(50, 70))] for _ in range(8)]
    completions = [[1] * min(128, max(5, int(rng.lognormvariate(4.2, 0.5)))) for _ in range(64)]
    groups = [g for g in range(8) if rng.random() < live] or [0]
    return Batch([prompts[g] for g in groups for _ in range(8)], [completions[g * 8 + j] for g in groups for j in range(8)], True)


def test_a_rank_far_ahead_moves_completions_even_past_half_the_gap():
    """Two 101-token completions of a 60-token prompt against one short sample: moving one
    completion (more than half the gap less the prompt) still evens the ranks, 160 against 171."""
    a, b = [7] * 60, [8] * 10
    batch = Batch([a, a, b], [[1] * 101, [1] * 101, [1] * 2], True)
    loads = sorted(sum(batch.forward_tokens(g) for g in share) for share in batch.rank_shares(2048, 2))
    assert loads == [160, 171]


def test_units_hold_one_prompt_within_the_budget_and_every_sample_once():
    batch = _default_job_batch(1)
    budget = 700  # below a whole group's row: prompts' samples split over rows
    groups = batch.unit_groups(budget)
    units = [u for g in groups for u in g]
    assert len(units) > 8
    assert sorted(i for u in units for i in u) == list(range(64))
    for unit in units:
        assert len({tuple(batch.prompts[i]) for i in unit}) == 1
        assert batch.width(unit) <= budget
    for group in groups:
        assert max(batch.width(u) for u in group) * len(group) <= budget
    # Sharing costs fewer padded tokens than a row per sample (about 40% fewer here): the point of it.
    plain = Batch(batch.prompts, batch.completions)
    cost = lambda b: sum(len(g) * max(b.width(u) for u in g) for g in b.unit_groups(2048))  # noqa: E731
    assert cost(batch) < 0.7 * cost(plain)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_data_parallel_ranks_get_even_forward_tokens_whole_groups_split_where_needed(ranks):
    """The ranks' shares cover every sample once, each rank's micro-batches within the budget and
    a prompt's samples sharing it; on these batches two ranks' forward tokens stay within one prompt
    and one completion of each other, and more ranks within a fifth of the mean in the median, with groups
    left out (an odd count of whole groups left the old deal a group ahead: 24% apart in the median
    of these batches at 2 ranks, 45% and 70% at 3 and 4). Splitting a group computes its prompt once more."""
    spreads = []
    for seed in range(60):
        batch = _default_job_batch(seed, live=0.75)
        shares = batch.rank_shares(2048, ranks)
        assert sorted(i for share in shares for g in share for i in g) == list(range(len(batch)))
        for g in (g for share in shares for g in share):
            assert batch.forward_tokens(g) <= 2048
        loads = [sum(batch.forward_tokens(g) for g in share) for share in shares]
        if ranks == 2:
            assert max(loads) - min(loads) <= max(map(len, batch.prompts)) + max(map(len, batch.completions)), seed
        spreads.append((max(loads) - min(loads)) / (sum(loads) / ranks))
        assert sum(loads) <= sum(batch.forward_tokens(g) for g in batch.micro_batches(2048)) + ranks * 8 * 70
    assert sorted(spreads)[len(spreads) // 2] < 0.2


def test_a_run_with_shared_prompts_trains_as_one_without(tmp_path, policy):
    """Same seed, same rollouts: the first iteration's loss and gradient norm agree to float32 rounding."""
    runs = {}
    for share in (True, False):
        c = config(tmp_path / str(share), policy, **{"train.iterations": 1, "train.share_prompts": share})
        trainer = Trainer(c, progress=False, log=lambda m: None)
        runs[share] = trainer.train()[0]
    a, b = runs[True], runs[False]
    assert a["completion_len"] == b["completion_len"] and a["reward"] == b["reward"]
    assert a["grad_norm"] > 0
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_ranks_whose_shares_split_a_prompt_sum_to_the_one_process_gradient(tmp_path, policy):
    """rank_shares may give two ranks some completions of one prompt each (each computes the prompt):
    the ranks' gradients, as the all-reduce sums them, are one process's over the whole batch."""
    from rlhfspec.rl.learner import COUNTS, Learner
    from rlhfspec.rl.objective import Targets

    c = config(tmp_path, policy, **{"train.shard_optimizer": "false", "train.share_prompts": "true"})
    model, _ = load_model(policy, dtype="float32")
    model.train().requires_grad_(True)
    rng = random.Random(3)
    vocab = model.config.vocab_size
    long, short = [rng.randrange(4, vocab) for _ in range(6)], [rng.randrange(4, vocab) for _ in range(4)]
    completions = [[rng.randrange(4, vocab) for _ in range(n)] for n in (11, 9, 12, 10, 2)]
    batch = Batch([long] * 4 + [short], completions, True)
    shares = batch.rank_shares(c.train.micro_batch_tokens, 2)
    assert all(any(batch.prompts[i] == long for g in share for i in g) for share in shares)  # the long prompt on both ranks
    targets = Targets(batch.mask(), None, torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5]))
    rows = list(range(len(batch)))

    def gradients(learners) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for learner in learners:
            learner._backward(batch, targets, rows, rows, {**dict.fromkeys(COUNTS, 0.0), "gap_max": 0.0}, True)
        return [p.grad.clone() for p in model.parameters()]

    one = gradients([Learner(c, model)])
    two = gradients([Learner(c, model, rank=r, world=2) for r in range(2)])
    for a, b in zip(one, two):
        assert (a - b).abs().max().item() <= 1e-5 * max(a.abs().max().item(), 1e-6)
