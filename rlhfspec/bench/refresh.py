"""`rlhfspec bench refresh`: the draft model's acceptance per RL iteration, refreshed by distillation or not."""

from __future__ import annotations

from dataclasses import replace

from rlhfspec.bench.common import machine, results_file, write_json, write_section
from rlhfspec.bench.e2e import train_records
from rlhfspec.rl.config import load_config


def run(config_path: str | None = None, iterations: int = 5, overrides: list[str] | None = None,
        json_path: str | None = None, record: bool = False, log=print) -> dict:
    """Same seed and config, drafting with the distilled draft model at a fixed n = 2 (so every step
    measures acceptance), with and without refreshing the draft on each iteration's rollouts."""
    base = load_config(config_path, overrides or [])
    gen = replace(base.generation, spec=True, strategy="static", num_draft_tokens=2, drafters=["draft"])
    curves = {}
    for label, refresh in (("refresh on", True), ("refresh off", False)):
        records = train_records(base, replace(gen, refresh_draft=refresh), iterations)
        curves[label] = [{"iteration": r["iteration"], "acceptance": r.get("acceptance/draft"), "reward": r["reward"],
                          "refresh_s": r.get("refresh/draft_s")} for r in records]
        log(f"{label}: acceptance per iteration " + ", ".join(f"{c['acceptance']:.3f}" for c in curves[label]))
    result = {"machine": machine(), "iterations": iterations, "curves": curves}
    write_json(json_path, result)
    # The table is printed always; it goes into benchmarks/RESULTS.md only with record.
    results = results_file(record)
    from rlhfspec.bench.plots import acceptance_curves

    png = acceptance_curves(curves, results.parent / "refresh_acceptance.png")
    log(write_section("refresh", _markdown(result, config_path, iterations, overrides, png.name), path=results))
    return result


def _markdown(r: dict, config_path, iterations: int, overrides, png: str) -> str:
    cmd = "rlhfspec bench refresh" + (f" --config {config_path}" if config_path else "") + f" --iterations {iterations}"
    cmd += "".join(f" {o}" for o in overrides or [])
    on, off = r["curves"]["refresh on"], r["curves"]["refresh off"]
    lines = [
        "## Drafter refresh: draft-model acceptance as the policy drifts",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {r['machine']}  ",
        "Default run, drafting with the distilled draft at n = 2 on every step; refresh = distil the draft on each "
        "iteration's rollouts against the updated policy (generation.refresh_seconds per iteration).",
        "",
        "| iteration | acceptance, refresh on | acceptance, refresh off | reward on | reward off |",
        "|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(on, off):
        lines.append(f"| {a['iteration']} | {a['acceptance']:.3f} | {b['acceptance']:.3f} | {a['reward']:.3f} | {b['reward']:.3f} |")
    lines += ["", f"![acceptance per iteration]({png})"]
    return "\n".join(lines)
