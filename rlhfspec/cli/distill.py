"""`rlhfspec distill-draft`: train a small draft model, or an eagle head, on the policy's own text."""

from __future__ import annotations

from pathlib import Path

from rlhfspec.errors import RlhfspecError


def register(sub) -> None:
    p = sub.add_parser("distill-draft", help="distill a small draft model (or an eagle head) from the policy")
    p.add_argument("--kind", choices=["draft", "eagle"], default="draft",
                   help="draft: a small LM sharing the policy's vocabulary; eagle: a one-layer head over the policy's own features")
    p.add_argument("--policy", default="default")
    p.add_argument("--layers", type=int, default=None, help="draft model layers (default 2)")
    p.add_argument("--hidden", type=int, default=None, help="draft model width (default 256)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="score only the K most frequent tokens (q = 0 elsewhere); default: all for a draft model, 8192 for an eagle head")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-prompts", type=int, default=640, help="prompts the policy answers to make the training text")
    p.add_argument("--prompts-from", default=None, metavar="CONFIG",
                   help="make the training text from this RL config's own prompts (its task or dataset) instead of RL-style ones")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-seconds", type=float, default=None, help="time budget of the training phase (default 420 s; 300 s for an eagle head)")
    p.add_argument("--feature-weight", type=float, default=None, help="eagle: weight of the feature regression against the KL term")
    p.add_argument("--unroll", choices=["on", "off"], default=None,
                   help="eagle: also train the second link of chains, from the head's own predicted features")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from rlhfspec import load_model
    from rlhfspec.distill.run import DistillJob, EagleJob, distill_draft, distill_eagle

    prompts = {} if args.prompts_from is None else {"prompts": run_prompts(args.prompts_from), "prompts_name": args.prompts_from}
    if args.kind == "eagle":
        if args.layers is not None or args.hidden is not None:
            raise RlhfspecError("--layers and --hidden shape a draft model; an eagle head has one layer of the policy's own shape.")
        job = EagleJob(train_prompts=args.train_prompts, lr=args.lr, seed=args.seed, **prompts,
                       **{k: v for k, v in (("draft_vocab", args.draft_vocab), ("train_seconds", args.train_seconds),
                                            ("feature_weight", args.feature_weight),
                                            ("unroll", None if args.unroll is None else args.unroll == "on")) if v is not None})
        distill = distill_eagle
    else:
        if args.feature_weight is not None or args.unroll is not None:
            raise RlhfspecError("--feature-weight and --unroll shape an eagle head's training; pass --kind eagle.")
        job = DistillJob(layers=2 if args.layers is None else args.layers, hidden=256 if args.hidden is None else args.hidden,
                         draft_vocab=args.draft_vocab, train_prompts=args.train_prompts, lr=args.lr, seed=args.seed, **prompts,
                         train_seconds=420.0 if args.train_seconds is None else args.train_seconds)
        distill = distill_draft
    job.check()  # before the policy loads; the job checks --draft-vocab against its vocabulary again
    if args.threads:
        torch.set_num_threads(args.threads)
    policy, tok = load_model(args.policy, dtype="float32")
    distill(policy, tok, args.out, job)
    return 0


def run_prompts(config_path: str):
    """(n, seed) -> n prompts of the RL run `config_path` describes: its own prompt source (task or
    dataset) as the run makes it, seeded with `seed`. The config and its source load here, so a bad
    one fails before any model does."""
    from rlhfspec.rl.config_files import load_config
    from rlhfspec.rl.trainer import prompt_source

    config = load_config(config_path)

    def make(n: int, seed: int) -> list[str]:
        config.train.seed = seed
        return [row["prompt"] for row in prompt_source(config).next(n)]

    make(1, 0)
    return make
