"""The calibration table: every published point has its source and a roofline prediction beside it."""

from rlhfspec.bench.sim_calibrate import POINTS, run


def test_every_published_point_is_cited_and_predicted(tmp_path):
    result = run(json_path=str(tmp_path / "cal.json"), log=lambda *_: None)
    assert len(result["rows"]) == len(POINTS)
    for r in result["rows"]:
        assert r["source"].startswith("https://") and r["ms_per_token"] > 0
        assert r["roofline_ms"] > 0 and abs(r["ratio"] - r["roofline_ms"] / r["ms_per_token"]) < 0.01
