"""`rlhfspec bench refresh`: a frozen draft model, a refreshed one and a refreshed eagle head run the
same job round-robin, and the table and the JSON say what each accepted and what refresh cost."""

from __future__ import annotations

import json

from rlhfspec import load_model
from rlhfspec.bench.refresh import run
from rlhfspec.distill.eagle import new_head
from tests.rl.helpers import tiny_policy_dir


def test_the_refresh_comparison_runs_every_drafter_and_writes_its_table(tmp_path):
    policy = tiny_policy_dir(tmp_path / "policy")
    draft = tiny_policy_dir(tmp_path / "draft", seed=1)  # another tiny model over the same vocabulary
    model, _ = load_model(policy, dtype="float32")
    head = new_head(model, list(range(model.config.vocab_size))).save(tmp_path / "head")
    settings = {"frozen": (str(draft), False), "refreshed": (str(draft), True), "head": (str(head), True)}
    overrides = {"model.policy": policy, "data.prompts_per_iteration": 2, "generation.num_generations": 2,
                 "generation.max_new_tokens": 6, "reward.functions": "[tests.rl.rewards:digit_count]"}
    lines = []
    result = run(None, 2, [a for k, v in overrides.items() for a in (f"--{k}", str(v))], json_path=str(tmp_path / "refresh.json"),
                 log=lines.append, settings=settings)
    assert result["completed"] == 2 and list(result["curves"]) == ["frozen", "refreshed", "head"]
    for label, points in result["curves"].items():
        assert [p["iteration"] for p in points] == [0, 1] and all(p["acceptance"] is not None for p in points), label
    assert all(p["refresh_s"] == 0 and p["refresh_steps"] == 0 for p in result["curves"]["frozen"])
    assert all(p["refresh_s"] > 0 for p in result["curves"]["refreshed"] + result["curves"]["head"])
    assert json.loads((tmp_path / "refresh.json").read_text())["summary"] == result["summary"]
    table = lines[-1]
    assert "| 1 |" in table and "refresh share, head" in table and "2 of 2 iterations completed" in table
