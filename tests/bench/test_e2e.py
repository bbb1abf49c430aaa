"""`rlhfspec bench e2e --compare precision`, `prompts` and `skip`: every setting runs the same job and the table comes out."""

from __future__ import annotations

import json

from rlhfspec.bench.e2e import PRECISIONS, SHARING, TRAINER_SETTINGS, run
from tests.rl.helpers import tiny_policy_dir


def _overrides(tmp_path, reward: str = "digit_count") -> list[str]:
    policy = tiny_policy_dir(tmp_path / "policy")
    overrides = {"model.policy": policy, "data.prompts_per_iteration": 2, "generation.num_generations": 2,
                 "generation.max_new_tokens": 6, "generation.speculative": "false", "reward.functions": f"[tests.rl.rewards:{reward}]"}
    return [a for k, v in overrides.items() for a in (f"--{k}", str(v))]


def test_the_precision_comparison_runs_every_setting_and_writes_its_table(tmp_path):
    lines = []
    result = run(None, 2, _overrides(tmp_path), json_path=str(tmp_path / "e2e.json"), log=lines.append, compare="precision")
    assert list(result["stages"]) == list(PRECISIONS)
    assert result["relative_to_float32"]["float32"] == {"generation_s": 1.0, "training_s": 1.0, "iteration_s": 1.0}
    for label, runs in result["runs"].items():
        assert len(runs) == 2 and all(r["gen_tokens"] > 0 for r in runs), label
    # bfloat16 training: the float32 engine's logprobs are measured against the trainer's
    assert result["logprob_gap"]["bf16 train, float32 generation"]["max"] > 1e-3
    assert json.loads((tmp_path / "e2e.json").read_text())["stages"] == result["stages"]
    table = lines[-1]
    assert "<!-- bench" not in table and "| bf16 train + generation |" in table and "--compare precision" in table


def test_the_prompt_sharing_comparison_trains_fewer_tokens_on_the_same_samples(tmp_path):
    lines = []
    result = run(None, 2, _overrides(tmp_path), json_path=str(tmp_path / "e2e.json"), log=lines.append, compare="prompts")
    assert list(result["stages"]) == list(SHARING)
    plain, shared = (result["runs"][label] for label in SHARING)
    assert plain[0]["gen_tokens"] == shared[0]["gen_tokens"] and plain[0]["reward"] == shared[0]["reward"]  # the same first rollout
    assert shared[0]["train_tokens"] < plain[0]["train_tokens"]  # 2 samples a prompt: each prompt computed once, not twice
    assert result["relative_to_reference"]["a row per sample"]["training_s"] == 1.0
    table = lines[-1]
    assert "| prompts shared |" in table and "--compare prompts" in table


def test_the_skip_comparison_trains_no_sample_of_a_group_that_scored_alike(tmp_path):
    """A reward that only reads the prompt: every group scores alike, so the skipping row runs no
    training forward at all, and both rows sample the same completions."""
    lines = []
    result = run(None, 2, _overrides(tmp_path, "per_prompt"), json_path=str(tmp_path / "e2e.json"), log=lines.append, compare="skip")
    every, skipping = (result["runs"][label] for label in TRAINER_SETTINGS["skip"]["values"])
    assert [r["gen_tokens"] for r in every] == [r["gen_tokens"] for r in skipping]
    assert all(r["train_tokens"] > 0 and r["skipped_samples"] == 0 for r in every)
    assert all(r["train_tokens"] == 0 and r["skipped_samples"] == 4 for r in skipping)
    table = lines[-1]
    assert "| zero-advantage skipped |" in table and "--compare skip" in table
