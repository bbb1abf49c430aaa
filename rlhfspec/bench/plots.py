"""PNG plots for benchmark tables (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def speedup_vs_n(rows: list[dict], path: Path) -> Path:
    """One panel per (drafter, temperature): speedup over plain decoding vs n, a line per batch size."""
    plt = _plt()
    panels = sorted({(r["drafter"], r["temperature"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (drafter, temp) in zip(axes[0], panels):
        for batch in sorted({r["batch"] for r in rows}):
            pts = sorted((r["n"], r["speedup"]) for r in rows if (r["drafter"], r["temperature"], r["batch"]) == (drafter, temp, batch))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {batch}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{drafter}, temperature {temp:g}")
        ax.set_xlabel("draft tokens n")
    axes[0][0].set_ylabel("speedup vs plain decoding")
    axes[0][-1].legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def acceptance_curves(curves: dict, path: Path) -> Path:
    """Acceptance per RL iteration, a line per setting."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for label, points in curves.items():
        pts = [(p["iteration"], p["acceptance"]) for p in points if p["acceptance"] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("draft acceptance")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def realloc_timeline(timelines: dict, instances: int, path: Path) -> Path:
    """One panel per setting (realloc off, on): each instance's live samples over time; moves marked."""
    plt = _plt()
    fig, axes = plt.subplots(len(timelines), 1, figsize=(8, 2.6 * len(timelines)), sharex=True, squeeze=False)
    for ax, (label, tl) in zip(axes[:, 0], timelines.items()):
        for i in range(instances):
            pts = [(t, live) for t, inst, live in tl.points if inst == i]
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label=f"instance {i}")
        for t, move in tl.moves:
            ax.axvline(t, color="grey", lw=0.5, alpha=0.5)
        ax.set_title(f"reallocation {label}" + (f" ({len(tl.moves)} moves, grey lines)" if tl.moves else ""))
        ax.set_ylabel("live samples")
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("seconds into the rollout")
    return _save(fig, plt, path)


def rollout_timeline(traces: dict, path: Path) -> Path:
    """Per policy: live batch size, chosen draft length (coloured by drafter) and tokens/s over the rollout."""
    plt = _plt()
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    colors = {None: "grey", "ngram": "tab:orange", "draft": "tab:blue"}
    for label, records in traces.items():
        t = [r.start_s for r in records]
        axes[0].plot(t, [r.batch for r in records], label=label)
        rate = [r.emitted / max(r.seconds, 1e-9) for r in records]
        smooth = [sum(rate[max(0, i - 4) : i + 1]) / len(rate[max(0, i - 4) : i + 1]) for i in range(len(rate))]
        axes[2].plot(t, smooth, label=label)
        if label != "plain":
            for drafter in sorted({r.drafter for r in records}, key=str):
                pts = [(r.start_s, sum(r.n) / max(r.batch, 1)) for r in records if r.drafter == drafter]
                axes[1].scatter([p[0] for p in pts], [p[1] for p in pts], s=6, color=colors.get(drafter, "tab:green"),
                                label=f"{label}: {drafter or 'plain'}")
    axes[0].set_ylabel("live samples")
    axes[1].set_ylabel("draft tokens (mean n)")
    axes[2].set_ylabel("tokens/s")
    axes[2].set_xlabel("seconds into the rollout")
    for ax in axes:
        ax.legend(fontsize=7)
    return _save(fig, plt, path)


def peer_curves(runs: dict, path: Path) -> Path:
    """Two panels, a line per side: mean reward and iteration seconds per iteration."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    from matplotlib.ticker import MaxNLocator

    for side, records in runs.items():
        its = [r["iteration"] for r in records]
        label = {"trl": "TRL"}.get(side, side)
        axes[0].plot(its, [r["reward"] for r in records], marker="o", label=label)
        axes[1].plot(its, [r["iteration_s"] for r in records], marker="o", label=label)
    axes[0].set_ylabel("reward (mean over the iteration's samples)")
    axes[1].set_ylabel("seconds per iteration")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    return _save(fig, plt, path)
