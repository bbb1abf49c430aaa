"""Drafter refresh in the RL loop: an eagle head's refresh lowers its loss on held-out rollouts,
from a teacher forward or from the targets the engine kept while generating; its state (master
weights, optimizer, batch order, buffered rollouts) resumes exactly, and with refresh_drop a head
is refreshed only once its acceptance falls, and a refresh keeps to its time budget."""

import pytest
import torch

from rlhfspec import SamplingParams, generate, load_model
from rlhfspec.distill.eagle import EagleDistiller, new_head
from rlhfspec.distill.teacher import teacher_examples
from rlhfspec.engine.drafters import EagleDrafter
from rlhfspec.engine.instance import GenerationInstance
from rlhfspec.engine.sequence import GenerationOutput, Sequence
from rlhfspec.rl.checkpoint import from_json, to_json
from rlhfspec.rl.drafting import DraftRefresher, rollout_examples
from rlhfspec.rl.logprobs import Batch
from tests.conftest import StoppedClock, random_prompts


@pytest.fixture
def setting(tiny_checkpoint):
    policy, _ = load_model(tiny_checkpoint("llama", initializer_range=0.4), dtype="float32")
    prompts = random_prompts(48, policy.config.vocab_size, 3, 8, seed=0)
    outs = generate(policy, prompts, SamplingParams(max_new_tokens=20, ignore_eos=True), seed=1)
    batch = Batch([o.prompt_token_ids for o in outs[:40]], [o.token_ids for o in outs[:40]])
    held = Batch([o.prompt_token_ids for o in outs[40:]], [o.token_ids for o in outs[40:]])
    return policy, batch, held


def _loss(policy, head, batch):
    examples = teacher_examples(policy, [p + c for p, c in zip(batch.prompts, batch.completions)], [len(p) for p in batch.prompts],
                                k=32, features=True)
    distiller = EagleDistiller(head, policy)
    with torch.no_grad():
        return distiller.loss(examples).item()


def test_a_refresh_lowers_the_heads_loss_on_heldout_rollouts(setting):
    policy, batch, held = setting
    drafter = EagleDrafter(new_head(policy, list(range(policy.config.vocab_size))), policy)
    before = _loss(policy, drafter.head, held)
    stats = DraftRefresher([drafter], seconds=600, max_steps=80).refresh(policy, batch)  # steps, not seconds, end it
    assert stats["refresh/eagle_s"] > 0
    assert _loss(policy, drafter.head, held) < 0.9 * before


def test_an_unrolled_refresh_also_trains_the_chains_second_link(setting):
    policy, batch, _ = setting
    plain, unrolled = (DraftRefresher([EagleDrafter(new_head(policy, list(range(policy.config.vocab_size))), policy)], seconds=60,
                                      max_steps=2, unroll=unroll) for unroll in (False, True))
    for refresher in (plain, unrolled):
        refresher.refresh(policy, batch)
    assert "ce2" not in plain.distillers["eagle"].parts
    assert {"ce", "ce2", "feature", "feature2"} <= set(unrolled.distillers["eagle"].parts)


def test_unroll_auto_trains_the_second_link_when_the_iterations_drafts_were_mostly_chains(setting):
    """unroll "auto" reads the iteration's mean drafted chain length: single tokens (or no drafts)
    train the first link alone, chains of 2 the second too, refresh by refresh."""
    policy, batch, _ = setting
    refresher = DraftRefresher([EagleDrafter(new_head(policy, list(range(policy.config.vocab_size))), policy)], seconds=60,
                               max_steps=2, unroll="auto")
    seen = []
    for chains in ({"eagle": 1.0}, {"eagle": 2.0}, {"eagle": 1.4}, None, {"eagle": 1.5}):
        stats = refresher.refresh(policy, batch, chains=chains)
        seen.append((stats["refresh/eagle_unrolled"], "ce2" in refresher.distillers["eagle"].parts))
    assert seen == [(False, False), (True, True), (False, False), (False, False), (True, True)]


def test_a_rollout_reports_each_drafters_mean_chain_length():
    from rlhfspec.engine.report import InstanceStats
    from rlhfspec.rollout.generate import Generation
    from rlhfspec.rollout.coordinator import Timeline
    from rlhfspec.strategy.base import StepRecord

    stats = InstanceStats()
    for drafter, n in (("eagle", [1, 1, 0]), ("eagle", [2, 2]), ("ngram", [3, 0, 0]), (None, [0, 0])):
        stats.record(StepRecord(len(n), drafter, n, n, [min(d, 1) for d in n], len(n), 0.0, 0.0, 10.0))
    rollout = Generation([], [stats], Timeline(), 1.0)
    assert rollout.chain_length_by_drafter() == {"eagle": 6 / 4, "ngram": 3.0}
    assert rollout.acceptance_by_drafter() == {"eagle": 4 / 6, "ngram": 1 / 3}


def test_the_refresher_resumes_exactly_from_its_checkpointed_state(setting):
    policy, batch, _ = setting
    head = new_head(policy, list(range(policy.config.vocab_size)))
    a = DraftRefresher([EagleDrafter(head, policy)], seconds=60, max_steps=6)
    a.refresh(policy, batch)
    tensors: dict = {}
    saved = to_json(a.state_dict(), tensors)  # what the RL checkpoint writes (JSON + tensors)
    twin = new_head(policy, list(range(policy.config.vocab_size)))
    twin.load_state_dict(head.state_dict())  # the rollout's own checkpoint restores the live head
    b = DraftRefresher([EagleDrafter(twin, policy)], seconds=60, max_steps=6)
    b.load_state_dict(from_json(saved, {k: v.clone() for k, v in tensors.items()}))
    a.refresh(policy, batch)
    b.refresh(policy, batch)
    # Bitwise: a refresher that lost its optimizer moments or batch order would step elsewhere.
    assert all(torch.equal(x, y) for x, y in zip(head.state_dict().values(), twin.state_dict().values()))


def test_with_refresh_drop_a_head_is_refreshed_only_when_its_acceptance_falls(setting):
    policy, batch, _ = setting
    drafter = EagleDrafter(new_head(policy, list(range(policy.config.vocab_size))), policy)
    refresher = DraftRefresher([drafter], seconds=60, drop=0.05, max_steps=2)
    assert refresher.refresh(policy, batch, {"eagle": 0.60}) == {}  # the first measurement is the reference
    assert refresher.refresh(policy, batch, {"eagle": 0.57}) == {}  # within the tolerated drop
    assert refresher.refresh(policy, batch, {}) == {"refresh/eagle_idle": True}  # it did not draft: nothing measured
    assert "refresh/eagle_loss" in refresher.refresh(policy, batch, {"eagle": 0.54})
    assert refresher.refresh(policy, batch, {"eagle": 0.50}) == {}  # the new reference after a refresh
    assert refresher.reference == {"eagle": 0.50}


def test_without_refresh_drop_a_head_that_drafted_nothing_is_left_as_it_is(setting):
    """Every iteration's refresh trains the heads that drafted; one the selector did not run (absent
    from the iteration's acceptance) keeps its weights and costs no time. Without acceptance
    figures (None) every head is due."""
    policy, batch, _ = setting
    drafter = EagleDrafter(new_head(policy, list(range(policy.config.vocab_size))), policy)
    refresher = DraftRefresher([drafter], seconds=60, max_steps=2)
    before = {k: v.clone() for k, v in drafter.head.state_dict().items()}
    assert refresher.refresh(policy, batch, {}) == {"refresh/eagle_idle": True}
    assert all(torch.equal(before[k], v) for k, v in drafter.head.state_dict().items())
    assert refresher.refresh(policy, batch, {"eagle": 0.3})["refresh/eagle_steps"] == 2
    assert refresher.refresh(policy, batch)["refresh/eagle_steps"] == 2


def test_a_refresh_budget_covers_the_teachers_forward_and_the_distillation(setting):
    policy, batch, _ = setting
    drafter = EagleDrafter(new_head(policy, list(range(policy.config.vocab_size))), policy)
    refresher = DraftRefresher([drafter], seconds=60, max_steps=3)
    starved = refresher.refresh(policy, batch, seconds=1e-9)  # the teacher's forward alone takes longer
    assert starved["refresh/eagle_steps"] == 0 and "refresh/eagle_loss" not in starved
    assert refresher.refresh(policy, batch, seconds=600)["refresh/eagle_steps"] == 3  # max_steps comes first
    assert refresher.refresh(policy, batch)["refresh/eagle_steps"] == 3  # no budget: `seconds` per drafter
    # Knowing the teacher's rate from the refresh before, a refresh whose budget cannot hold one
    # sequence's forward runs none and takes no step.
    assert refresher.teacher_rate is not None
    none = refresher.refresh(policy, batch, seconds=1e-9)
    assert none["refresh/teacher_sequences"] == 0 and none["refresh/eagle_steps"] == 0


def test_the_teachers_forward_takes_only_the_sequences_it_expects_to_finish_by_its_deadline(setting, monkeypatch):
    from rlhfspec.distill import teacher

    policy, batch, _ = setting
    seqs, starts = [p + c for p, c in zip(batch.prompts, batch.completions)], [len(p) for p in batch.prompts]
    clock, forward = StoppedClock(), teacher.hidden_states

    def timed(model, ids, mask):  # every forward takes 10 ms per token of its sequences
        clock.now += 0.01 * mask.sum().item()
        return forward(model, ids, mask)

    monkeypatch.setattr(teacher, "time", clock)
    monkeypatch.setattr(teacher, "hidden_states", timed)
    tokens = [len(s) for s in seqs]
    first = sum(tokens[:8])
    deadline = 0.01 * (first + sum(tokens[8:13])) + 0.005  # room for the first micro-batch and 5 more sequences
    got = teacher_examples(policy, seqs, starts, micro_batch=8, deadline=deadline)
    assert len(got) == 13 and clock.now <= deadline
    # Without a rate yet, the first micro-batch runs whole even past the deadline; with one, nothing starts that cannot end in time.
    clock.now = 0.0
    assert len(teacher_examples(policy, seqs, starts, micro_batch=8, deadline=0.0)) == 8
    clock.now = 0.0
    assert teacher_examples(policy, seqs, starts, micro_batch=8, deadline=0.01 * tokens[0] - 0.005, seconds_per_token=0.01) == []
    assert clock.now == 0.0
    assert len(teacher_examples(policy, seqs, starts, micro_batch=8)) == len(seqs)


@pytest.mark.parametrize("targets", ["teacher", "rollout"])
def test_an_rl_run_drafts_with_an_eagle_head_refreshes_it_and_resumes(tmp_path, policy, targets):
    from rlhfspec.rl import checkpoint as ckpt
    from rlhfspec.rl.trainer import Trainer
    from tests.rl.helpers import rl_config

    model, _ = load_model(policy, dtype="float32")
    head_dir = new_head(model, list(range(model.config.vocab_size))).save(tmp_path / "head")
    settings = {"generation.speculative": "true", "generation.strategy": "static", "generation.num_draft_tokens": 2,
                "generation.drafters": f"[{head_dir}]", "generation.refresh_seconds": 2, "generation.num_generations": 4,
                "generation.max_new_tokens": 16, "generation.refresh_targets": targets, "generation.refresh_buffer": 2,
                "generation.refresh_unroll": targets == "rollout"}  # unrolled on one of the two runs
    records = Trainer(rl_config(tmp_path, policy, **settings, **{"train.iterations": 2}), progress=False, log=lambda m: None).train()
    assert all(r["acceptance/eagle"] is not None and r["refresh/eagle_s"] > 0 for r in records)
    # static n = 2, less where a sample had fewer tokens left; forced on or off, whatever the chains
    assert all(1.5 < r["chain/eagle"] <= 2.0 and r["refresh/eagle_unrolled"] == (targets == "rollout") for r in records)
    if targets == "rollout":  # no teacher forward; the buffer holds both iterations' samples
        buffered = [r["refresh/buffer_sequences"] for r in records]  # 8 samples an iteration, less any of one token
        assert 0 < buffered[0] < buffered[1] <= 16 and all("refresh/teacher_sequences" not in r for r in records)
    _, objects = ckpt.load(ckpt.latest(tmp_path / "run"))
    assert "eagle" in objects["refresh"]["distillers"] and len(objects["refresh"]["buffer"]) == (2 if targets == "rollout" else 0)
    resumed = Trainer(rl_config(tmp_path, policy, **settings, **{"train.iterations": 3}), resume=True, progress=False, log=lambda m: None)
    assert resumed.iteration == 2 and "eagle" in resumed.refresher.restored and len(resumed.refresher.buffer) == len(objects["refresh"]["buffer"])
    assert resumed.refresher.unroll == (targets == "rollout")
    assert len(resumed.train()) == 1


def _traced(policy, prompts, seed: int) -> list[GenerationOutput]:
    """The policy's completions with the Traces an instance keeps (an eagle drafter attached, so
    features too; plain decoding)."""
    drafter = EagleDrafter(new_head(policy, list(range(policy.config.vocab_size))), policy)
    inst = GenerationInstance(policy, len(prompts), 64, drafters=[drafter], keep_targets=32)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    done = inst.add([Sequence(i, p, params, seed=seed) for i, p in enumerate(prompts)])
    while inst.live:
        done += inst.step()
    return [GenerationOutput.of(s) for s in sorted(done, key=lambda s: s.sample_id)]


def test_a_refresh_from_the_engines_own_targets_lowers_the_heads_loss_without_a_forward(setting, monkeypatch):
    policy, _, held = setting
    outputs = _traced(policy, random_prompts(40, policy.config.vocab_size, 3, 8, seed=0), seed=1)
    examples = rollout_examples(outputs)
    teacher = teacher_examples(policy, [e.tokens for e in examples], [e.start for e in examples], k=32, features=True)
    for e, t in zip(examples, teacher):  # the engine's own targets are the teacher's, minus the last token
        torch.testing.assert_close(e.top_logprobs, t.top_logprobs, atol=1e-4, rtol=0)
        torch.testing.assert_close(e.features, t.features, atol=1e-4, rtol=0)
    drafter = EagleDrafter(new_head(policy, list(range(policy.config.vocab_size))), policy)
    before = _loss(policy, drafter.head, held)
    monkeypatch.setattr("rlhfspec.rl.drafting.teacher_examples", None)  # a refresh that ran a forward would fail
    refresher = DraftRefresher([drafter], seconds=600, max_steps=80, targets="rollout")
    stats = refresher.refresh(policy, None, outputs=outputs)
    assert stats["refresh/buffer_sequences"] == 40 and stats["refresh/eagle_steps"] == 80
    assert _loss(policy, drafter.head, held) < 0.9 * before


def test_rollout_targets_buffer_the_last_iterations_and_resume_exactly(setting):
    policy, _, _ = setting
    rounds = [_traced(policy, random_prompts(6, policy.config.vocab_size, 3, 8, seed=i), seed=i) for i in range(4)]
    head = new_head(policy, list(range(policy.config.vocab_size)))
    a = DraftRefresher([EagleDrafter(head, policy)], seconds=60, max_steps=4, targets="rollout", buffer=2)
    for outputs in rounds[:3]:
        stats = a.refresh(policy, None, outputs=outputs)
    assert stats["refresh/buffer_sequences"] == 12 and [c[0].tokens for c in a.buffer] == [rollout_examples(o)[0].tokens for o in rounds[1:3]]
    tensors: dict = {}
    saved = to_json(a.state_dict(), tensors)
    twin = new_head(policy, list(range(policy.config.vocab_size)))
    twin.load_state_dict(head.state_dict())
    b = DraftRefresher([EagleDrafter(twin, policy)], seconds=60, max_steps=4, targets="rollout", buffer=2)
    b.load_state_dict(from_json(saved, {k: v.clone() for k, v in tensors.items()}))
    a.refresh(policy, None, outputs=rounds[3])
    b.refresh(policy, None, outputs=rounds[3])
    assert all(torch.equal(x, y) for x, y in zip(head.state_dict().values(), twin.state_dict().values()))


def test_a_sample_resubmitted_without_its_trace_finishes_without_one_and_the_refresh_leaves_it_out(setting):
    """A Ray actor ships its live samples without their Traces (`untraced`); a sample resubmitted
    from such a copy after its actor died goes on elsewhere without one, and a refresh from rollout
    targets trains on the others and counts it."""
    from rlhfspec.engine.report import Migrant
    from rlhfspec.rollout.ray_backend import untraced

    policy, _, _ = setting
    prompts = random_prompts(4, policy.config.vocab_size, 3, 8, seed=0)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)

    def instance():
        return GenerationInstance(policy, 4, 64, drafters=[EagleDrafter(new_head(policy, list(range(policy.config.vocab_size))), policy)],
                                  keep_targets=32)

    dying, spare = instance(), instance()
    dying.add([Sequence(i, p, params, seed=1) for i, p in enumerate(prompts)])
    for _ in range(3):
        dying.step()
    shipped = untraced(dying.report())
    assert all(s.trace is None and s.tokens for s in shipped.live) and all(s.trace is not None for s in dying.live)
    spare.adopt([Migrant(shipped.live[0])])  # the actor is gone: its KV recomputed from the tokens it reported
    done = []
    while spare.live:
        done += spare.step()
    dying.export([0], with_kv=False)  # the rest finish where they were, with their Traces
    while dying.live:
        done += dying.step()
    outputs = [GenerationOutput.of(s) for s in sorted(done, key=lambda s: s.sample_id)]
    assert [len(o.token_ids) for o in outputs] == [12] * 4 and [o.trace is None for o in outputs] == [True, False, False, False]
    assert [e.tokens for e in rollout_examples(outputs)] == [e.tokens for e in rollout_examples(outputs[1:])]
    refresher = DraftRefresher([dying.drafters["eagle"]], seconds=60, max_steps=2, targets="rollout")
    stats = refresher.refresh(policy, None, outputs=outputs)
    assert stats["refresh/untraced"] == 1 and stats["refresh/buffer_sequences"] == 3 and stats["refresh/eagle_steps"] == 2


def test_with_trace_every_only_every_kth_sample_keeps_a_trace(setting):
    """generation.refresh_trace_every k: the samples whose id is a multiple of k keep their targets
    and features, the same as with every sample traced; the refresh trains on those alone."""
    policy, _, _ = setting
    prompts = random_prompts(6, policy.config.vocab_size, 3, 8, seed=0)

    def outputs(every):
        head = new_head(policy, list(range(policy.config.vocab_size)))
        inst = GenerationInstance(policy, 6, 64, drafters=[EagleDrafter(head, policy)], keep_targets=32, trace_every=every)
        done = inst.add([Sequence(i, p, SamplingParams(max_new_tokens=12, ignore_eos=True), seed=1) for i, p in enumerate(prompts)])
        while inst.live:
            done += inst.step()
        return [GenerationOutput.of(s) for s in sorted(done, key=lambda s: s.sample_id)]

    every, some = outputs(1), outputs(3)
    assert [o.trace is not None for o in some] == [True, False, False, True, False, False]
    assert [o.token_ids for o in some] == [o.token_ids for o in every]
    for a, b in zip(rollout_examples(some), rollout_examples([every[0], every[3]])):
        assert a.tokens == b.tokens and torch.equal(a.top_logprobs, b.top_logprobs) and torch.equal(a.features, b.features)
    thinned = DraftRefresher([EagleDrafter(new_head(policy, list(range(policy.config.vocab_size))), policy)], seconds=60, max_steps=1,
                             targets="rollout", trace_every=3).refresh(policy, None, outputs=some)
    assert thinned["refresh/buffer_sequences"] == 2 and thinned["refresh/untraced"] == 0  # thinned out is not lost
