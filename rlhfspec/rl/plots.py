"""`rlhfspec plot RUN_DIR`: reward, KL, stage times and acceptance per iteration, as PNGs."""

from __future__ import annotations

import re
from pathlib import Path

from rlhfspec.errors import RlhfspecError
from rlhfspec.rl.metrics import read


def plot_run(run_dir: Path) -> list[Path]:
    records = read(run_dir)
    if not records:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in records]
    out = []

    def save(fig, name):
        path = Path(run_dir) / "plots" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(its, [r["reward"] for r in records], marker="o", label="reward (mean)")
    if records[0].get("success") is not None:
        ax.plot(its, [r["success"] for r in records], marker=".", label="success rate")
    ax.set_xlabel("iteration")
    ax.legend()
    save(fig, "reward.png")

    for key, label in (("kl", "KL(policy || reference)"), ("entropy", "policy entropy (nats per token)")):
        if any(key in r for r in records):
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(its, [r.get(key) for r in records], marker="o")
            ax.set_xlabel("iteration")
            ax.set_ylabel(label)
            save(fig, f"{key}.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(records)
    for key in ("generation_s", "inference_s", "training_s", "sync_s"):
        vals = [r[key] for r in records]
        ax.bar(its, vals, bottom=bottom, label=key.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("iteration")
    ax.set_ylabel("seconds")
    ax.legend()
    save(fig, "stage_times.png")

    keys = sorted({k for r in records for k in r if k.startswith("acceptance/")})
    if keys:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in keys:
            ax.plot(its, [r.get(k) for r in records], marker="o", label=k.split("/", 1)[1])
        ax.set_xlabel("iteration")
        ax.set_ylabel("draft acceptance")
        ax.legend()
        save(fig, "acceptance.png")
    return out


def plot_compare(run_dirs: list[Path], out: Path, key: str = "reward") -> Path:
    """One metric per iteration for several runs (e.g. seeds) on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Seeds of one setting (run directories named SETTING_sN) share a colour.
    groups: dict[str, list[str]] = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in run_dirs:
        records = read(run)
        if not records:
            raise RlhfspecError(f"{run} has no metrics.jsonl records to plot.")
        name = Path(run).name
        setting = re.sub(r"_s[0-9]+$", "", name)
        members = groups.setdefault(setting, [])
        members.append(name)
        ax.plot([r["iteration"] for r in records], [r.get(key) for r in records], marker="o", markersize=3,
                color=f"C{list(groups).index(setting) % 10}", linestyle=("-", "--", ":", "-.")[(len(members) - 1) % 4], label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel(key)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
