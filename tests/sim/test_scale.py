"""`bench sim-scale`: a tiny version runs both scenarios and profiles and renders its table and plots."""

import json
from pathlib import Path

import pytest

from rlhfspec.bench.sim_scale import PROFILES, SCENARIOS, SimScaleConfig, run
from rlhfspec.cli.main import main
from rlhfspec.errors import RlhfspecError


def test_tiny_sim_scale_writes_every_feature_per_scenario_and_profile(tmp_path):
    out, lines = tmp_path / "scale.json", []
    # 2 prompts x 8 samples, short responses: the scenarios' clusters and profiles, a small rollout.
    run(SimScaleConfig(scale=0.004, lengths="lognormal:60,0.8,300"), json_path=str(out), log=lines.append)
    data = json.loads(out.read_text())
    assert set(data["scenarios"]) == {s.key for s in SCENARIOS}
    for s in data["scenarios"].values():
        assert set(s["profiles"]) == {p.key for p in PROFILES}
        for p in s["profiles"].values():
            features = [r["feature"] for r in p["rows"]]
            assert features[0] == "plain" and features[1].startswith("static speculation (eagle")
            assert features[2:] == ["adaptive selection", "reallocation", "all (adaptive + reallocation)"]
            assert p["workload"]["samples"] == 16 and all(r["tokens"] == p["workload"]["tokens"] for r in p["rows"])
            assert all(r["speedup"] > 0 for r in p["rows"])
    text = lines[-1]
    assert "## What to expect at scale (simulated)" in text and "| plain |" in text
    assert f"Command: `rlhfspec bench sim-scale --scale 0.004 --lengths lognormal:60,0.8,300 --json {out}`" in text
    folder = Path(next(line for line in text.splitlines() if "not recorded" in line).split("plots in ")[1].rstrip(")"))
    for png in ("sim_scale.png", "sim_scale_timeline_8b.png", "sim_scale_timeline_70b.png"):
        assert (folder / png).stat().st_size > 0


def test_unknown_scenario_or_profile_is_one_sentence(capsys):
    assert main(["bench", "sim-scale", "--scenarios", "7b"]) == 2
    assert capsys.readouterr().err.strip() == "rlhfspec: error: scenario '7b' is unknown; choose from 8b, 70b."
    with pytest.raises(RlhfspecError, match="scenario '7b' is unknown; choose from 8b, 70b"):
        run(SimScaleConfig(scenarios=("7b",)), log=lambda *_: None)
    with pytest.raises(RlhfspecError, match="acceptance profile 'x' is unknown"):
        run(SimScaleConfig(profiles=("x",)), log=lambda *_: None)
    with pytest.raises(RlhfspecError, match="scale is 2"):
        run(SimScaleConfig(scale=2), log=lambda *_: None)
