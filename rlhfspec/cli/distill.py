"""`rlhfspec distill-draft`: train a small draft model on the policy's own text."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("distill-draft", help="distill a small draft model from the policy")
    p.add_argument("--policy", default="default")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--draft-vocab", type=int, default=None, help="score only the K most frequent tokens (q = 0 elsewhere)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-prompts", type=int, default=640, help="prompts the policy answers to make the training text")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-seconds", type=float, default=420.0, help="time budget of the training phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from rlhfspec import load_model
    from rlhfspec.distill.run import DistillJob, distill_draft

    job = DistillJob(layers=args.layers, hidden=args.hidden, draft_vocab=args.draft_vocab,
                     train_prompts=args.train_prompts, lr=args.lr, train_seconds=args.train_seconds, seed=args.seed)
    job.check()  # before the policy loads; distill_draft checks --draft-vocab against its vocabulary
    if args.threads:
        torch.set_num_threads(args.threads)
    policy, tok = load_model(args.policy, dtype="float32")
    distill_draft(policy, tok, args.out, job)
    return 0
