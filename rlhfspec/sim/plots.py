"""The simulated rollout's timeline: each instance's live samples and utilisation over time, per feature set."""

from __future__ import annotations

from pathlib import Path


def sim_timeline(runs: dict, instances: int, path: Path) -> Path:
    """A row per feature set: live samples per instance over simulated time (moves as grey lines),
    and beside it each instance's share of time spent stepping, in 40 slices of the makespan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max(r.makespan_s for r in runs.values())
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 2.4 * len(runs)), sharex=True, squeeze=False)
    for (left, right), (label, run) in zip(axes, runs.items()):
        for i in range(instances):
            pts = [(t, live) for t, inst, live in run.timeline.points if inst == i]
            left.step([0.0] + [p[0] for p in pts], [pts[0][1] if pts else 0] + [p[1] for p in pts], where="post", lw=0.9)
        for t, _ in run.timeline.moves:
            left.axvline(t, color="grey", lw=0.4, alpha=0.4)
        left.set_title(f"{label}: {run.makespan_s:.0f} s" + (f", {run.moves} moves" if run.moves else ""), fontsize=9)
        left.set_ylabel("live samples")
        width = run.makespan_s / 40
        for i, curve in enumerate(run.utilisation_curve(40)):
            right.plot([(k + 0.5) * width for k in range(40)], curve, lw=0.9, label=f"instance {i}" if instances <= 8 else None)
        right.set_ylim(0, 1.05)
        right.set_title(f"utilisation, mean {sum(run.utilisation) / len(run.utilisation):.0%}", fontsize=9)
    axes[-1, 0].set_xlabel("simulated seconds")
    axes[-1, 1].set_xlabel("simulated seconds")
    axes[-1, 0].set_xlim(0, end)
    if instances <= 8:
        axes[0, 1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
