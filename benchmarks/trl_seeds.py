"""Several seeds of `rlhfspec bench trl` side by side: a table and a PNG of both sides' rewards and seconds.

    .venv/bin/python benchmarks/trl_seeds.py --png PATH JSON...

Each JSON is one `bench trl --json` run (one seed). The table gives, per run, the medians the bench
reports (iteration seconds of both sides and their ratio) and, over the same iterations, both sides'
tokens and seconds per 1,000 generated tokens, so runs whose policies wrote longer answers compare
fairly; and the rewards' last values and spread over the seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="bench trl --json files, one per seed")
    ap.add_argument("--png", required=True)
    args = ap.parse_args()
    runs = [json.load(open(p)) for p in args.runs]
    print("| seed | rlhfspec s | TRL s | x | rlhfspec tokens | TRL tokens | rlhfspec s / 1k tokens | TRL s / 1k tokens | x per token | last reward, rlhfspec | last reward, TRL |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        first, last = map(int, re.search(r"(\d+)\.\.(\d+)", run["medians_over"]).groups())  # "iterations 1..3"
        sides = {s: run["runs"][s][first : last + 1] for s in ("rlhfspec", "trl")}
        secs = {s: statistics.median(r["iteration_s"] for r in rows) for s, rows in sides.items()}
        tokens = {s: statistics.median(r["gen_tokens"] for r in rows) for s, rows in sides.items()}
        per_k = {s: 1000 * sum(r["iteration_s"] for r in rows) / sum(r["gen_tokens"] for r in rows) for s, rows in sides.items()}
        print(f"| {run['job']['seed']} | {secs['rlhfspec']:.2f} | {secs['trl']:.2f} | {secs['trl'] / secs['rlhfspec']:.2f} | "
              f"{tokens['rlhfspec']:.0f} | {tokens['trl']:.0f} | {per_k['rlhfspec']:.2f} | {per_k['trl']:.2f} | "
              f"{per_k['trl'] / per_k['rlhfspec']:.2f} | {run['runs']['rlhfspec'][-1]['reward']:.3f} | {run['runs']['trl'][-1]['reward']:.3f} |")
    for side in ("rlhfspec", "trl"):
        last = [run["runs"][side][-1]["reward"] for run in runs]
        print(f"{side}: last rewards {', '.join(f'{x:.3f}' for x in last)} (spread {min(last):.3f}-{max(last):.3f})")
    print("\n| iteration | seeds | rlhfspec reward, mean | TRL reward, mean | paired difference, mean | t |")
    print("|---:|---:|---:|---:|---:|---:|")
    for it in range(max(len(run["runs"]["trl"]) for run in runs)):
        pairs = [(run["runs"]["rlhfspec"][it]["reward"], run["runs"]["trl"][it]["reward"]) for run in runs if len(run["runs"]["trl"]) > it]
        print(f"| {it} | {len(pairs)} | {statistics.mean(a for a, _ in pairs):.3f} | {statistics.mean(b for _, b in pairs):.3f} | "
              f"{_paired(pairs)} |")
    print("\nEach run's mean reward over its iterations 4.. (runs longer than 4 iterations):")
    for run in runs:
        ours, theirs = ([r["reward"] for r in run["runs"][side][4:]] for side in ("rlhfspec", "trl"))
        if ours:
            print(f"  seed {run['job']['seed']}, iterations 4-{len(ours) + 3}: rlhfspec {statistics.mean(ours):.3f}, TRL "
                  f"{statistics.mean(theirs):.3f}; paired by iteration {_paired(list(zip(ours, theirs)))}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k, run in enumerate(runs):
        colour = f"C{k}"
        for side, style in (("rlhfspec", "-"), ("trl", "--")):
            rows = run["runs"][side]
            label = f"{'rlhfspec' if side == 'rlhfspec' else 'TRL'}, seed {run['job']['seed']}"
            left.plot([r["iteration"] for r in rows], [r["reward"] for r in rows], style, color=colour, marker="o", label=label)
            right.plot([r["iteration"] for r in rows], [r["iteration_s"] for r in rows], style, color=colour, marker="o", label=label)
    left.set(xlabel="iteration", ylabel="reward mean", title="reward (solid: rlhfspec, dashed: TRL)")
    right.set(xlabel="iteration", ylabel="seconds", title="iteration time", ylim=(0, None))
    right.legend(fontsize=7, ncol=2)
    fig.suptitle(runs[0]["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


def _paired(pairs: list[tuple[float, float]]) -> str:
    """'mean difference | t' of paired values (t blank under two pairs)."""
    diffs = [a - b for a, b in pairs]
    mean = statistics.mean(diffs)
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return f"{mean:+.3f} | "
    return f"{mean:+.3f} | {mean / (statistics.stdev(diffs) / len(diffs) ** 0.5):+.2f}"


if __name__ == "__main__":
    main()
