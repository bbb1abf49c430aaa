"""`rlhfspec train`, `rlhfspec export` and `rlhfspec plot`."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    t = sub.add_parser("train", help="run RL (GRPO, RLOO, PPO) from a YAML config with --section.key value overrides")
    t.add_argument("--config", type=Path, default=None, help="YAML config (default: the built-in defaults, i.e. configs/grpo_arith.yaml)")
    t.add_argument("--resume", action="store_true", help="continue the run in run.output_dir from its last checkpoint")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--ray-address", default=None, help="run the Ray parts (generation.backend ray) on this cluster (same as --run.ray_address)")
    t.set_defaults(run=run_train, overrides=True)
    e = sub.add_parser("export", help="write a run's policy as a Hugging Face checkpoint")
    e.add_argument("run_dir", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument("--overwrite", action="store_true", help="write into OUT even if it already holds files")
    e.set_defaults(run=run_export)
    p = sub.add_parser("plot", help="PNG plots of a run's metrics (reward, KL, stage times, acceptance)")
    p.add_argument("run_dir", type=Path, nargs="+")
    p.add_argument("--compare", type=Path, default=None, help="instead: one PNG of every run's reward per iteration")
    p.add_argument("--key", default="reward", help="the metric --compare plots")
    p.set_defaults(run=run_plot)


def run_train(args) -> int:
    from rlhfspec.rl.config_files import load_config
    from rlhfspec.rl.plots import plot_run
    from rlhfspec.rl.trainer import Trainer

    from rlhfspec.rl.metrics import read

    config = load_config(args.config, args.extra + (["--run.ray_address", args.ray_address] if args.ray_address else []))
    trainer = Trainer(config, resume=args.resume, progress=not args.no_progress)
    if trainer.iteration >= config.train.iterations:
        trainer.close()
        print(f"{trainer.run_dir} has already run {trainer.iteration} iterations (train.iterations is {config.train.iterations}); "
              "nothing to do: pass a larger --train.iterations to continue it.")
        return 0
    trainer.train()
    records = read(trainer.run_dir)  # the whole run, the iterations before a resume included
    if records:
        first, last = records[0], records[-1]
        print(f"done: reward {first['reward']:.3f} -> {last['reward']:.3f} over {len(records)} iterations "
              f"({sum(r['iteration_s'] for r in records) / 60:.1f} min); generation {_share(records):.0%} of the time")
    for png in plot_run(trainer.run_dir):
        print(f"plot: {png}")
    print(f"run directory: {trainer.run_dir} (rlhfspec export {trainer.run_dir} OUT writes a Hugging Face checkpoint)")
    return 0


def _share(records) -> float:
    return sum(r["generation_s"] for r in records) / max(sum(r["iteration_s"] for r in records), 1e-9)


def run_export(args) -> int:
    import yaml

    from rlhfspec.errors import RlhfspecError
    from rlhfspec.models.checkpoint import save_pretrained
    from rlhfspec.models.loader import load_model
    from rlhfspec.rl import checkpoint as ckpt

    path = ckpt.latest(args.run_dir)
    if path is None:
        raise RlhfspecError(f"{args.run_dir} has no checkpoint to export; export takes a run directory (run.output_dir). "
                            "To write a model itself as a Hugging Face checkpoint, use rlhfspec.save_pretrained(model, dir, tokenizer).")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.overwrite:
        raise RlhfspecError(f"{args.out} already exists and is not an empty directory (it may be a model you still need); "
                            "pass --overwrite to write the checkpoint there anyway, or choose another directory.")
    config = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    model, tok = load_model(config["model"]["policy"], dtype=config["model"]["dtype"])
    tensors, _ = ckpt.load(path)
    model.load_state_dict(tensors["policy"], strict=True)
    out = save_pretrained(model, args.out, tokenizer=tok)
    print(f"exported {path.name} to {out}")
    return 0


def run_plot(args) -> int:
    from rlhfspec.rl.plots import plot_compare, plot_run

    if args.compare:
        print(plot_compare(args.run_dir, args.compare, args.key))
        return 0
    from rlhfspec.errors import RlhfspecError
    from rlhfspec.rl.metrics import read

    for run_dir in args.run_dir:
        if not run_dir.is_dir():
            raise RlhfspecError(f"run directory {run_dir} does not exist.")
        if not read(run_dir):
            raise RlhfspecError(f"{run_dir} has no metrics.jsonl records to plot; is it a run directory (run.output_dir)?")
        for png in plot_run(run_dir):
            print(png)
    return 0
