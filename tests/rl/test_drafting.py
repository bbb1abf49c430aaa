"""Drafter refresh in the RL loop: an eagle head's refresh lowers its loss on held-out rollouts,
its state (master weights, optimizer, batch order) resumes exactly, and with refresh_drop a head
is refreshed only once its acceptance falls, and a refresh keeps to its time budget."""

import pytest
import torch

from rlhfspec import SamplingParams, generate, load_model
from rlhfspec.distill.eagle import EagleDistiller, new_head
from rlhfspec.distill.teacher import teacher_examples
from rlhfspec.engine.drafters import EagleDrafter
from rlhfspec.rl.checkpoint import from_json, to_json
from rlhfspec.rl.drafting import DraftRefresher
from rlhfspec.rl.logprobs import Batch
from tests.conftest import random_prompts


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
    assert refresher.refresh(policy, batch, {}) == {}  # it did not draft: nothing measured
    assert "refresh/eagle_loss" in refresher.refresh(policy, batch, {"eagle": 0.54})
    assert refresher.refresh(policy, batch, {"eagle": 0.50}) == {}  # the new reference after a refresh
    assert refresher.reference == {"eagle": 0.50}


def test_a_refresh_budget_covers_the_teachers_forward_and_the_distillation(setting):
    policy, batch, _ = setting
    drafter = EagleDrafter(new_head(policy, list(range(policy.config.vocab_size))), policy)
    refresher = DraftRefresher([drafter], seconds=60, max_steps=3)
    starved = refresher.refresh(policy, batch, seconds=1e-9)  # the teacher's forward alone takes longer
    assert starved["refresh/eagle_steps"] == 0 and "refresh/eagle_loss" not in starved
    assert refresher.refresh(policy, batch, seconds=600)["refresh/eagle_steps"] == 3  # max_steps comes first
    assert refresher.refresh(policy, batch)["refresh/eagle_steps"] == 3  # no budget: `seconds` per drafter
    # The teacher's forward stops at its deadline after the micro-batch that passes it.
    seqs = [p + c for p, c in zip(batch.prompts, batch.completions)]
    late = teacher_examples(policy, seqs, [len(p) for p in batch.prompts], micro_batch=8, deadline=0.0)
    assert len(late) == 8 and len(teacher_examples(policy, seqs, [len(p) for p in batch.prompts], micro_batch=8)) == len(seqs)


def test_an_rl_run_drafts_with_an_eagle_head_refreshes_it_and_resumes(tmp_path, policy):
    from rlhfspec.rl import checkpoint as ckpt
    from rlhfspec.rl.trainer import Trainer
    from tests.rl.helpers import rl_config

    model, _ = load_model(policy, dtype="float32")
    head_dir = new_head(model, list(range(model.config.vocab_size))).save(tmp_path / "head")
    settings = {"generation.speculative": "true", "generation.strategy": "static", "generation.num_draft_tokens": 2,
                "generation.drafters": f"[{head_dir}]", "generation.refresh_seconds": 2, "generation.num_generations": 4,
                "generation.max_new_tokens": 16}
    records = Trainer(rl_config(tmp_path, policy, **settings, **{"train.iterations": 2}), progress=False, log=lambda m: None).train()
    assert all(r["acceptance/eagle"] is not None and r["refresh/eagle_s"] > 0 for r in records)
    _, objects = ckpt.load(ckpt.latest(tmp_path / "run"))
    assert "eagle" in objects["refresh"]["distillers"]
    resumed = Trainer(rl_config(tmp_path, policy, **settings, **{"train.iterations": 3}), resume=True, progress=False, log=lambda m: None)
    assert resumed.iteration == 2 and "eagle" in resumed.refresher.restored
    assert len(resumed.train()) == 1
