"""The adaptive strategy inside the engine: lossless, and it records every decision."""

from rlhfspec import SamplingParams, generate, load_model
from rlhfspec.engine.drafters import DraftModelDrafter, NgramDrafter
from tests.conftest import random_prompts


def test_adaptive_generation_equals_plain_greedy_and_records_its_choices(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFSPEC_CACHE", str(tmp_path))
    policy, _ = load_model(tiny_checkpoint("llama"), dtype="float32")
    draft, _ = load_model(tiny_checkpoint("llama", seed=1, num_hidden_layers=1), dtype="float32")
    prompts = [p + p for p in random_prompts(12, policy.config.vocab_size, 3, 12, seed=2)]
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    plain = generate(policy, prompts, params)
    stats = []
    adaptive = generate(policy, prompts, params, drafter=[NgramDrafter(), DraftModelDrafter(draft, policy)], strategy="adaptive", instance_stats=stats)
    assert [o.token_ids for o in adaptive] == [o.token_ids for o in plain]
    records = stats[0].records
    assert records and all(r.batch >= 1 and r.verify_s > 0 for r in records)
    assert {r.drafter for r in records} - {None, "ngram", "draft"} == set()
    assert (tmp_path / "profiles").is_dir()  # the cost profile is cached for the next run
