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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
