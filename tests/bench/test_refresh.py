"""`rlhfspec bench refresh`: a frozen draft model, a refreshed one and a refreshed eagle head run the
same job round-robin, and the table and the JSON say what each accepted and what refresh cost."""

from __future__ import annotations

import json

import pytest

from rlhfspec import load_model
from rlhfspec.bench.refresh import SETTINGS, parse_setting, run, section_name
from rlhfspec.errors import RlhfspecError
from rlhfspec.distill.eagle import new_head
from tests.rl.helpers import tiny_policy_dir


def test_the_refresh_comparison_runs_every_drafter_and_writes_its_table(tmp_path, monkeypatch):
    from rlhfspec.rl import trainer as trainers

    made = {}

    def trainer(cfg, **kw):  # the real Trainer; the draft length each setting's run was given is kept
        made[cfg.run.output_dir] = cfg.generation.num_draft_tokens
        return real(cfg, **kw)

    real = trainers.Trainer
    monkeypatch.setattr(trainers, "Trainer", trainer)  # run() imports it from there when it runs
    policy = tiny_policy_dir(tmp_path / "policy")
    draft = tiny_policy_dir(tmp_path / "draft", seed=1)  # another tiny model over the same vocabulary
    model, _ = load_model(policy, dtype="float32")
    head = new_head(model, list(range(model.config.vocab_size))).save(tmp_path / "head")
    settings = {"frozen": (str(draft), False), "refreshed": (str(draft), True),
                "head": (str(head), True, ("generation.refresh_targets=rollout", "generation.refresh_buffer=2", "generation.num_draft_tokens=1"))}
    overrides = {"model.policy": policy, "data.prompts_per_iteration": 2, "generation.num_generations": 2,
                 "generation.max_new_tokens": 6, "reward.functions": "[tests.rl.rewards:digit_count]"}
    lines = []
    result = run(None, 2, [a for k, v in overrides.items() for a in (f"--{k}", str(v))], json_path=str(tmp_path / "refresh.json"),
                 log=lines.append, settings=settings)
    assert result["completed"] == 2 and list(result["curves"]) == ["frozen", "refreshed", "head"]
    assert [made[k] for k in sorted(made)] == [2, 2, 1]  # n = 2 unless a setting's own overrides say otherwise
    for label, points in result["curves"].items():
        assert [p["iteration"] for p in points] == [0, 1] and all(p["acceptance"] is not None for p in points), label
    assert all(p["refresh_s"] == 0 and p["refresh_steps"] == 0 for p in result["curves"]["frozen"])
    assert all(p["refresh_s"] > 0 for p in result["curves"]["refreshed"] + result["curves"]["head"])
    assert json.loads((tmp_path / "refresh.json").read_text())["summary"] == result["summary"]
    table = lines[-1]
    assert "| 1 |" in table and "refresh share, head" in table and "2 of 2 iterations completed" in table
    assert "--setting 'frozen=" in table and ":frozen'" in table and "(frozen, refreshed, head)" in table
    assert f"--setting 'head={head} generation.refresh_targets=rollout generation.refresh_buffer=2 generation.num_draft_tokens=1'" in table


def test_a_setting_names_its_drafter_and_whether_it_is_refreshed_and_goes_to_its_own_section():
    assert parse_setting("task head=/tmp/head") == ("task head", ("/tmp/head", True, ()))
    assert parse_setting("draft, frozen = draft:frozen") == ("draft, frozen", ("draft", False, ()))
    assert parse_setting("own=eagle generation.refresh_targets=rollout generation.refresh_buffer=4") == \
        ("own", ("eagle", True, ("generation.refresh_targets=rollout", "generation.refresh_buffer=4")))
    assert section_name(SETTINGS) == "refresh"
    assert section_name(dict([parse_setting("Eagle (task), refreshed=/h")])) == "refresh-eagle-task-refreshed"
    for bad in ("eagle", "=eagle", "label=", "label=:frozen", "label=eagle refresh_buffer"):
        with pytest.raises(RlhfspecError, match=r"is not LABEL=DRAFTER\[:frozen\] \[section.key=value ...\]"):
            parse_setting(bad)
