"""`rlhfspec bench refresh`: drafter acceptance per RL iteration as the policy drifts: a draft
model left frozen, a draft model refreshed on each iteration's rollouts, an eagle head refreshed."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from rlhfspec.bench.common import bench_command, machine, median, results_file, write_json, write_section
from rlhfspec.errors import RlhfspecError
from rlhfspec.rl.config_files import load_config

# label -> (drafter, refreshed[, overrides of its own run])
SETTINGS = {
    "draft model, frozen": ("draft", False),
    "draft model, refreshed": ("draft", True),
    "eagle head, refreshed": ("eagle", True),
}


def parse_setting(text: str) -> tuple[str, tuple]:
    """A `--setting` value: 'LABEL=DRAFTER[:frozen] [section.key=value ...]'. DRAFTER is a keyword
    (draft, eagle) or a draft model or eagle head directory, refreshed unless ':frozen' follows it;
    the overrides apply to this setting's run alone (generation.refresh_targets=rollout, say)."""
    label, sep, rest = text.partition("=")
    drafter, *overrides = rest.split() or [""]
    refreshed = True
    for suffix, value in ((":frozen", False), (":refreshed", True)):
        if drafter.endswith(suffix):
            drafter, refreshed = drafter[: -len(suffix)], value
    if not sep or not label.strip() or not drafter or any("=" not in o for o in overrides):
        raise RlhfspecError(f"--setting {text!r} is not LABEL=DRAFTER[:frozen] [section.key=value ...] (DRAFTER: draft, eagle or a directory).")
    return label.strip(), (drafter, refreshed, tuple(overrides))


def section_name(settings: dict) -> str:
    """Where the results go: "refresh" for the standard settings, else a name made of the labels (so
    a comparison of other drafters does not replace the standard table)."""
    if settings == SETTINGS:
        return "refresh"
    return "refresh-" + "-".join(re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") for label in settings)


def run(config_path: str | None = None, iterations: int = 20, overrides: list[str] | None = None,
        json_path: str | None = None, record: bool = False, log=print, settings: dict | None = None) -> dict:
    """The same seed and config in each setting, drafting at a fixed n = 2 on every step (so every
    step measures acceptance). The settings run round-robin, one iteration each in turn in one
    process, so a shared machine's slow spells fall on all alike; the JSON is rewritten after
    every round, so a run stopped early still shows every setting at the same iteration."""
    from rlhfspec.allocator import release_memory
    from rlhfspec.rl.trainer import Trainer

    settings = settings or SETTINGS
    curves: dict[str, list[dict]] = {label: [] for label in settings}
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="rlhfspec-bench-") as tmp:
        trainers = {}
        try:
            for i, (label, (drafter, refresh, *own)) in enumerate(settings.items()):
                # a setting's own overrides come last: they may change the fixed n = 2 too
                cfg = load_config(config_path, [*(overrides or []), "--generation.speculative", "true",
                                                "--generation.strategy", "static", "--generation.num_draft_tokens", "2",
                                                "--generation.drafters", f"[{drafter}]", "--generation.refresh_draft", str(refresh).lower(),
                                                "--train.iterations", str(iterations), "--run.output_dir", str(Path(tmp) / f"run{i}"),
                                                "--run.tensorboard", "false", *(own[0] if own else ())])
                trainers[label] = (drafter, Trainer(cfg, progress=False, log=lambda m: None))
            for it in range(iterations):
                for label, (drafter, trainer) in trainers.items():
                    release_memory()
                    r = trainer.step()
                    trainer.iteration += 1
                    name = trainer.rollout.drafters[0].name
                    point = {"iteration": it, "acceptance": r.get(f"acceptance/{name}"), "reward": r["reward"],
                             "iteration_s": r["iteration_s"], "refresh_s": r.get(f"refresh/{name}_s", 0.0),
                             "refresh_steps": r.get(f"refresh/{name}_steps", 0)}
                    point["refresh_share"] = point["refresh_s"] / r["iteration_s"]
                    curves[label].append(point)
                    log(f"iteration {it} {label:24} acceptance {point['acceptance']:.3f}, refresh {point['refresh_s']:.1f} s "
                        f"({point['refresh_steps']} steps, {point['refresh_share']:.0%} of {r['iteration_s']:.0f} s), reward {r['reward']:.3f}")
                result = _result(curves, iterations, settings)
                write_json(json_path, result)
        finally:
            for _, trainer in trainers.values():
                trainer.close()
    results = results_file(record)
    from rlhfspec.bench.plots import acceptance_curves

    name = section_name(settings)
    png = acceptance_curves(curves, results.parent / f"{name.replace('-', '_')}_acceptance.png")
    body = markdown(result, config_path, iterations, overrides, png.name, json_path, record, settings)
    log(write_section(name, body, path=results))
    return result


def _result(curves: dict, iterations: int, settings: dict) -> dict:
    summary = {}
    for label, points in curves.items():
        acc = [p["acceptance"] for p in points if p["acceptance"] is not None]
        summary[label] = {"min_acceptance": min(acc, default=None), "last_acceptance": acc[-1] if acc else None,
                          "median_refresh_share": median([p["refresh_share"] for p in points]),
                          "max_refresh_share": max(p["refresh_share"] for p in points)}
    return {"machine": machine(), "iterations": iterations, "completed": min(len(p) for p in curves.values()),
            "settings": {k: {"drafter": d, "refresh": r, "overrides": list(own[0]) if own else []} for k, (d, r, *own) in settings.items()},
            "summary": summary, "curves": curves}


def markdown(r: dict, config_path, iterations: int, overrides, png: str, json_path: str | None = None, record: bool = False,
             settings: dict | None = None) -> str:
    custom = settings is not None and settings != SETTINGS
    flags = [f"--setting '{k}={' '.join([d + ('' if refresh else ':frozen'), *(own[0] if own else ())])}'"
             for k, (d, refresh, *own) in settings.items()] if custom else []
    cmd = bench_command("refresh", config_path, iterations, [*flags, *(overrides or [])], json_path, record)
    labels = list(r["curves"])
    lines = [
        "## Drafter refresh: acceptance as the policy drifts" + (f" ({', '.join(labels)})" if custom else ""),
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {r['machine']}  ",
        f"The run's config and seed in every setting, drafting at a fixed n = 2 on every step (unless a setting's own "
        "overrides set generation.num_draft_tokens); refreshed = distilled on each "
        "iteration's rollouts within generation.refresh_budget of the iteration: against the updated policy, its teacher "
        "forward included, or with generation.refresh_targets=rollout on the targets and features the engine kept while it "
        f"generated (no forward). The settings ran round-robin in one process; {r['completed']} of {iterations} iterations completed. "
        "Sampled drafts change which tokens a lossless step draws (not their distribution), so the settings' completions, "
        "and from iteration 1 on their policies, differ. "
        "Acceptance = accepted / drafted tokens; refresh share = refresh seconds / iteration seconds.",
        "",
        "| iteration | " + " | ".join(f"acceptance, {k}" for k in labels) + " | " + " | ".join(f"refresh share, {k}" for k in labels if r["settings"][k]["refresh"]) + " |",
        "|---:|" + "---:|" * (len(labels) + sum(1 for k in labels if r["settings"][k]["refresh"])),
    ]
    for i in range(r["completed"]):
        acc = [r["curves"][k][i]["acceptance"] for k in labels]
        share = [r["curves"][k][i]["refresh_share"] for k in labels if r["settings"][k]["refresh"]]
        lines.append(f"| {i} | " + " | ".join("" if a is None else f"{a:.3f}" for a in acc) + " | " + " | ".join(f"{s:.1%}" for s in share) + " |")
    lines += ["", "| setting | lowest acceptance | last | median refresh share | largest |", "|---|---:|---:|---:|---:|"]
    for k, s in r["summary"].items():
        fmt = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"| {k} | {fmt(s['min_acceptance'])} | {fmt(s['last_acceptance'])} | {s['median_refresh_share']:.1%} | {s['max_refresh_share']:.1%} |")
    lines += ["", f"![acceptance per iteration]({png})"]
    return "\n".join(lines)
