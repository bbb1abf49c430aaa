"""`rlhfspec simulate`: every feature row, the JSON and the timeline PNG, and errors as one line."""

import json

from rlhfspec.cli.main import main


def test_simulate_reports_each_feature_alone_and_together(tmp_path, capsys):
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    rc = main(["simulate", "--model", "7B", "--accelerator", "H100", "--instances", "2", "--prompts", "4", "--samples", "4",
               "--lengths", "lognormal:60,0.8,300", "--acceptance", "draft=0.8,0.7", "--static-n", "2,4",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["simulated"] is True
    features = [r["feature"] for r in data["rows"]]
    assert features[0] == "plain" and features[1].startswith("static speculation")
    assert features[2:] == ["adaptive selection", "reallocation", "all (adaptive + reallocation)"]
    for r in data["rows"]:
        assert r["tokens"] == data["workload"]["tokens"]
        assert r["speedup"] > 0 and len(r["utilisation"]) == 2 and len(r["utilisation_curve"]) == 2
    assert png.stat().st_size > 0
    assert "| plain |" in capsys.readouterr().out


def test_simulate_bad_input_is_one_line(capsys):
    assert main(["simulate", "--lengths", "lognormal:100", "--plot", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhfspec: error: lengths 'lognormal:100' is not lognormal:MEDIAN,SIGMA,CAP") and "\n" not in err
    assert main(["simulate", "--accelerator", "V100", "--plot", ""]) == 2
    assert "accelerator 'V100' is unknown" in capsys.readouterr().err
