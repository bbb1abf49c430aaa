"""Batch invariance: a row's logits are bitwise the same whatever else is in the step."""

import pytest
import torch

from rlhfspec import load_model
from rlhfspec.models.invariance import RowPlan, Verdicts, apply_rows, plan_rows, rowwise
from rlhfspec.models.kv_cache import KVCache
from tests.conftest import random_prompts


def feed(model, cache: KVCache, feeds: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    """One packed forward appending feeds[slot] to each slot; logits of every new row per slot."""
    slots = list(feeds)
    lens = [len(feeds[s]) for s in slots]
    model.ensure_positions(cache.max_len)
    with torch.inference_mode():
        att = cache.attend(slots, lens)
        flat = torch.tensor([t for s in slots for t in feeds[s]])
        logits = model.logits(model(flat, att.positions, att), att.invariant)
    cache.advance(slots, lens)
    return dict(zip(slots, logits.split(lens)))


def alone(model, prompt, cont):
    """Prompt prefilled alone, then the continuation one token per step: logits [len(prompt+cont), V]."""
    cache = KVCache(model.config, 1, len(prompt) + len(cont) + 1, model.dtype)
    rows = [feed(model, cache, {0: prompt})[0]]
    rows += [feed(model, cache, {0: [t]})[0] for t in cont]
    return torch.cat(rows)


class Crowd:
    """A cache of `slots` slots, every slot but `target` busy with a random sample of its own length."""

    def __init__(self, model, slots: int, target: int, seed: int, room: int = 160):
        self.model, self.target = model, target
        self.cache = KVCache(model.config, slots, room, model.dtype)
        self.gen = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        others = [s for s in range(slots) if s != target]
        lengths = torch.randint(2, 90, (len(others),), generator=self.gen).tolist()
        self.waiting = {s: torch.randint(3, vocab, (n,), generator=self.gen).tolist() for s, n in zip(others, lengths)}

    def step(self, target_tokens: list[int]) -> torch.Tensor:
        """One forward: the target's tokens, each other sample's prompt (first time) or one token."""
        vocab = self.model.config.vocab_size
        feeds = {}
        for s in range(self.cache.max_slots):
            if s == self.target:
                feeds[s] = target_tokens
            elif s in self.waiting:
                feeds[s] = self.waiting.pop(s)
            else:
                feeds[s] = torch.randint(3, vocab, (1 + int(torch.randint(0, 3, (1,), generator=self.gen)),), generator=self.gen).tolist()
        # Slot order inside the packed forward varies too.
        order = torch.randperm(len(feeds), generator=self.gen).tolist()
        return feed(self.model, self.cache, {list(feeds)[i]: feeds[list(feeds)[i]] for i in order})[self.target]


def chunks(tokens: list[int], sizes=(1, 3, 1, 2, 4)):
    out, i, k = [], 0, 0
    while i < len(tokens):
        out.append(tokens[i : i + sizes[k % len(sizes)]])
        i += len(out[-1])
        k += 1
    return out


def check_placements(model, seed: int = 0):
    """The target's logits alone vs batched with 15 others (ragged chunks, shuffled slot order),
    vs migrated (KV rows moved into another cache and slot), vs recomputed (one prefill of its
    prompt and tokens beside other samples): bitwise equal at every position."""
    vocab = model.config.vocab_size
    prompt = random_prompts(1, vocab, 11, 11, seed=seed)[0]
    cont = random_prompts(1, vocab, 24, 24, seed=seed + 1)[0]
    want = alone(model, prompt, cont)
    split = 12  # migrate / recompute after this many continuation tokens

    crowd = Crowd(model, 16, target=9, seed=seed)
    rows = [crowd.step(prompt)] + [crowd.step(c) for c in chunks(cont)]
    assert torch.equal(torch.cat(rows), want), "batched with 15 others"

    crowd = Crowd(model, 16, target=9, seed=seed + 2)
    rows = [crowd.step(prompt)] + [crowd.step(c) for c in chunks(cont[:split])]
    k, v = crowd.cache.rows(9)
    moved = Crowd(model, 5, target=3, seed=seed + 3)
    moved.cache.load_rows(3, k, v)
    rows += [moved.step(c) for c in chunks(cont[split:], sizes=(2, 1))]
    assert torch.equal(torch.cat(rows), want), "migrated with its KV rows"

    fresh = Crowd(model, 4, target=0, seed=seed + 4)
    rows = [fresh.step(prompt + cont[:split])] + [fresh.step([t]) for t in cont[split:]]
    assert torch.equal(torch.cat(rows), want), "recomputed in one prefill"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "llama-mha-bias", "qwen2", "qwen3"])
def test_tiny_model_rows_are_bitwise_independent_of_placement(arch, dtype, tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint(arch), dtype=dtype, tokenizer=False)
    check_placements(model, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_model_rows_are_bitwise_independent_of_placement(dtype):
    model, _ = load_model("default", dtype=dtype, tokenizer=False)
    check_placements(model, seed=2)


def test_without_invariance_the_engine_still_matches_the_invariant_logits_closely(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("llama"), dtype="float32", tokenizer=False)
    prompts = random_prompts(3, model.config.vocab_size, 4, 30, seed=5)
    caches = {inv: KVCache(model.config, 3, 64, model.dtype, invariant=inv) for inv in (True, False)}
    got = {inv: feed(model, c, dict(enumerate(prompts))) for inv, c in caches.items()}
    for s in range(3):
        assert (got[True][s] - got[False][s]).abs().max().item() <= 1e-4


def _unstable(x: torch.Tensor) -> torch.Tensor:
    """A row function whose calls of 2 or 3 rows round differently, like a library's small-batch kernels."""
    y = x.double().cumsum(-1)
    if x.shape[0] in (2, 3):
        y = y + 1e-3
    return y.float()


def test_plan_rows_leaves_out_the_sizes_that_round_differently_and_pads_past_them():
    probe = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    plan = plan_rows(_unstable, probe)
    assert 2 not in plan.sizes and 3 not in plan.sizes and 1 in plan.sizes and plan.tile == 64
    assert plan.calls(2) == [(0, 2, 4)] and plan.calls(130) == [(0, 64, 64), (64, 64, 64), (128, 2, 4)]
    x = torch.randn(130, 8)
    got = apply_rows(_unstable, plan, x)
    assert torch.equal(got, torch.cat([_unstable(x[i : i + 1]) for i in range(130)]))


def test_a_function_whose_rows_depend_on_their_neighbours_runs_one_row_per_call():
    mixed = lambda x: x + x.roll(1, 0)  # noqa: E731
    assert plan_rows(mixed, torch.randn(16, 4), max_tile=16).sizes == (1,)


def test_apply_rows_passes_verified_sizes_through_in_one_call():
    calls = []
    fn = lambda x: calls.append(x.shape[0]) or x * 2  # noqa: E731
    plan = RowPlan((1, 2, 3, 4, 8))
    assert torch.equal(apply_rows(fn, plan, torch.ones(4, 2)), torch.full((4, 2), 2.0)) and calls == [4]
    calls.clear()
    apply_rows(fn, plan, torch.ones(13, 2))
    assert calls == [8, 8]  # 8 rows, then 5 padded to 8


@pytest.mark.parametrize("width", [64, 96, 40000])
def test_rowwise_exp_gives_each_row_the_bits_it_has_alone(width):
    x = torch.randn(300, width) if width < 40000 else torch.randn(3, width)
    got = rowwise(torch.exp, x)
    for r in (0, 1, x.shape[0] - 1):
        assert torch.equal(got[r], torch.exp(x[r : r + 1])[0])


def test_verdicts_are_computed_once_and_read_back_from_disk(tmp_path):
    path = tmp_path / "kernels.json"
    runs = []
    first = Verdicts(path).get("k", lambda: runs.append(1) or {"sizes": [1, 2]})
    again = Verdicts(path).get("k", lambda: runs.append(1) or {"sizes": [9]})
    assert first == again == {"sizes": [1, 2]} and runs == [1]
    path.write_text("not json")
    assert Verdicts(path).get("k", lambda: 7) == 7
