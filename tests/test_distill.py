"""Draft distillation on tiny models: the loss falls and the draft moves toward the policy."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhfspec import SamplingParams, generate, load_model
from rlhfspec.distill.run import DistillJob
from rlhfspec.distill.teacher import teacher_examples
from rlhfspec.distill.train import DistillConfig, Distiller, _to_local, frequent_tokens, new_draft
from rlhfspec.engine.drafters import DraftModelDrafter
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.checkpoint import save_pretrained
from tests.conftest import StoppedClock, random_prompts


def _overlap(policy, draft, examples):
    """Mean sum_x min(p(x), q(x)) over the examples' positions: the acceptance rate of one draft token."""
    from rlhfspec.models.batch import hidden_states, padded_batch

    with torch.no_grad():
        seqs = [e.tokens for e in examples]
        hp, hd = hidden_states(policy, *padded_batch(seqs)), hidden_states(draft, *padded_batch(seqs))
        total, count = 0.0, 0
        for r, e in enumerate(examples):
            rows = slice(e.start - 1, len(e.tokens) - 1)
            p = torch.softmax(policy.logits(hp[r, rows]), -1)
            q = torch.softmax(draft.logits(hd[r, rows]), -1)
            total += torch.minimum(p, q).sum().item()
            count += p.shape[0]
    return total / count


def test_distillation_lowers_the_loss_and_raises_the_overlap(tiny_checkpoint, tmp_path):
    policy, _ = load_model(tiny_checkpoint("llama", initializer_range=0.4), dtype="float32")
    prompts = random_prompts(24, policy.config.vocab_size, 3, 8, seed=0)
    outs = generate(policy, prompts, SamplingParams(max_new_tokens=24, ignore_eos=True), seed=1)
    examples = teacher_examples(policy, [o.prompt_token_ids + o.token_ids for o in outs], [len(o.prompt_token_ids) for o in outs], k=16)
    draft = new_draft(policy, layers=1, hidden=32)
    before = _overlap(policy, draft, examples)
    losses = Distiller(draft, DistillConfig(max_steps=150, lr=5e-3, batch_sequences=8)).fit(examples)
    after = _overlap(policy, draft, examples)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert after > before + 0.1
    # The saved draft loads like any checkpoint and drafts for the policy.
    path = save_pretrained(draft, tmp_path / "draft")
    loaded = DraftModelDrafter.load(path, policy)
    stats = []
    generate(policy, prompts[:4], SamplingParams(max_new_tokens=12, ignore_eos=True), drafter=loaded, num_draft_tokens=3, instance_stats=stats)
    assert stats[0].acceptance > 0


def test_a_fit_takes_no_step_that_its_mean_step_says_would_pass_its_time_budget(tiny_checkpoint, monkeypatch):
    from rlhfspec.distill import train

    policy, _ = load_model(tiny_checkpoint("llama", initializer_range=0.4), dtype="float32")
    prompts = random_prompts(8, policy.config.vocab_size, 3, 8, seed=0)
    outs = generate(policy, prompts, SamplingParams(max_new_tokens=8, ignore_eos=True), seed=1)
    examples = teacher_examples(policy, [o.prompt_token_ids + o.token_ids for o in outs], [len(o.prompt_token_ids) for o in outs], k=16)
    clock = StoppedClock()  # each training step below takes exactly one second on it
    monkeypatch.setattr(train, "time", clock)
    distiller = Distiller(new_draft(policy, layers=1, hidden=32), DistillConfig(seconds=2.5, max_steps=100, batch_sequences=4))
    loss = distiller.loss

    def timed(batch):
        clock.now += 1.0
        return loss(batch)

    distiller.loss = timed
    assert len(distiller.fit(examples)) == 2 and clock.now <= 2.5  # a third step would have ended at 3 s


def test_a_reduced_draft_vocabulary_maps_ids_and_keeps_the_frequent_ones():
    vocab = torch.tensor([2, 5, 9, 40])
    assert _to_local(torch.tensor([[5, 6], [40, 2]]), vocab).tolist() == [[1, -1], [3, 0]]
    from rlhfspec.distill.teacher import Example

    e = Example([1, 2, 3], 1, torch.tensor([[7, 8], [7, 9]]), torch.log(torch.tensor([[0.6, 0.3], [0.5, 0.4]])))
    assert frequent_tokens([e], 2, always=(0,)) == [0, 7]


def test_prompts_from_a_run_config_are_that_runs_task_seeded_by_the_job(tmp_path):
    from rlhfspec.cli.distill import run_prompts
    from rlhfspec.data.tasks import REASONING, arithmetic_problems
    from rlhfspec.distill.run import prompt_texts

    config = tmp_path / "run.yaml"
    config.write_text("data:\n  task: arithmetic\n  digits: 2\n  ops: '+'\ntrain:\n  seed: 5\n")
    texts = prompt_texts(6, seed=3, prompts=run_prompts(str(config)))
    assert texts == [p.prompt for p in arithmetic_problems(6, 3 * 1_000_003, digits=2, ops="+", template=REASONING)]
    assert prompt_texts(6, seed=4, prompts=run_prompts(str(config))) != texts
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "question {i}"}}\n' for i in range(5)))
    config.write_text(f"data:\n  task: {rows}\n")
    assert sorted(prompt_texts(5, seed=0, prompts=run_prompts(str(config)))) == [f"question {i}" for i in range(5)]


def test_a_draft_vocabulary_larger_than_the_policys_is_a_clear_error():
    DistillJob(draft_vocab=64).check(vocab_size=64)
    with pytest.raises(RlhfspecError, match=r"between 2 and the policy's vocabulary size \(64\), got 65"):
        DistillJob(draft_vocab=65).check(vocab_size=64)


# The teacher pass's pattern: a row's logits freed, the next row's allocated and then a small tensor
# kept after them. Prints the MB the process gives back when the second logits are freed.
_TEACHER_PATTERN = """
import torch
from rlhfspec.bench.common import _resident
from rlhfspec.allocator import fixed_mmap_threshold
print(fixed_mmap_threshold())
first = torch.ones(5 << 20)  # 20 MB of one row's logits, freed
del first
logits = torch.ones(5 << 20)  # the next row's
kept = torch.ones(75_000)  # 300 KB kept after them, as a row's features
before = _resident()
del logits
print((before - _resident()) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_row_logits_go_back_to_the_system_once_the_mmap_threshold_is_fixed():
    """glibc raises its threshold to the first freed block's size, so without the fixed threshold the
    second logits come from the heap below the kept tensor and none of their 20 MB is given back
    (then the distill jobs grew by about 14 MB per sequence)."""
    out = subprocess.run([sys.executable, "-c", _TEACHER_PATTERN], capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("this C library has no settable mmap threshold")
    assert int(out[1]) >= 15, f"{out[1]} MB of 20 given back"


# A 128 MB block freed and a 64 MB one allocated and touched: the minor page faults the second costs
# (the first is the larger so that small allocations carved from its freed space leave room).
_REUSE_PATTERN = """
import resource, sys, torch
from rlhfspec.allocator import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else "default")
first = torch.ones(32 << 20)
del first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
second = torch.ones(16 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_freed_memory_serves_the_next_large_block_without_page_faults():
    """By default glibc maps each large block anew and unmaps it when freed, so the next one faults in
    its pages again (64 MB: 16,384 of them; every training step's activations did); with
    keep_freed_memory the heap keeps the freed block and the next one reuses its pages."""
    def faults(mode):
        return subprocess.run([sys.executable, "-c", _REUSE_PATTERN, mode], capture_output=True, text=True, check=True).stdout.split()

    kept = faults("keep")
    if kept[0] != "True":
        pytest.skip("this C library has no such settings")
    assert int(kept[1]) < 1_000
    if Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().startswith("[always]"):
        return  # huge pages fault 2 MB at a time: the default's faults are few too
    assert int(faults("default")[1]) > 8_000
