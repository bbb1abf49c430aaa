"""Held-out acceptance of saved eagle heads on one set of prompts (a probe for [draft]).

    .venv/bin/python benchmarks/eagle_heldout.py [--prompts-from CONFIG] [--prompts N] [--seed S] [--json PATH] HEAD...

Every head is scored on the same rollouts: the policy's answers (temperature 1, at most 128 new
tokens) to N held-out prompts, RL-style ones or with --prompts-from those of an RL config's task,
drawn with the seed `distill-draft` uses for its held-out prompts (its --seed + 10,000). RL-style
held-out prompts are none that training draws; --training-prompts draws them from the training lists
instead (new responses to the prompts the heads were trained on, as this probe did before 2026-11-29). The figure is
the expected acceptance of one draft token at temperature 1, mean over response positions of
sum_x min(p(x), q(x)), as `distill-draft` reports it.
"""

from __future__ import annotations

import argparse
import json

import torch

from rlhfspec import load_model
from rlhfspec.cli.distill import run_prompts
from rlhfspec.distill.eagle import expected_acceptance
from rlhfspec.distill.run import HELDOUT_SEED, policy_rollouts
from rlhfspec.models.eagle import EagleHead


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("heads", nargs="+", help="eagle head directories")
    ap.add_argument("--prompts-from", default=None, help="an RL config: its task's prompts (default: RL-style prompts)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0, help="distill-draft's --seed; the prompts are drawn with it + 10,000")
    ap.add_argument("--training-prompts", action="store_true", help="RL-style prompts from the training lists")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    policy, tok = load_model("default", dtype="float32")
    policy.requires_grad_(False)
    source = None if args.prompts_from is None else run_prompts(args.prompts_from)
    seqs, starts = policy_rollouts(policy, tok, args.prompts, 128, args.seed + HELDOUT_SEED, log=print, source=source,
                                   heldout=not args.training_prompts)
    tokens = sum(len(s) - st for s, st in zip(seqs, starts))
    results = {"prompts": args.prompts_from or ("rl-style, training lists" if args.training_prompts else "rl-style, held out"), "rollouts": len(seqs), "response_tokens": tokens, "heads": {}}
    for path in args.heads:
        head = EagleHead.load(path, dtype=torch.float32)
        results["heads"][path] = expected_acceptance(policy, head, seqs, starts)
        print(f"{path}: {results['heads'][path]:.1%} on {len(seqs)} rollouts ({tokens} response tokens)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
