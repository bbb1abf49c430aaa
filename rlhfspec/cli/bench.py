"""`rlhfspec bench <name>`: benchmarks that write benchmarks/RESULTS.md."""

from __future__ import annotations

from rlhfspec.cli.generate import add_instance_args


RECORD = "write the table (and plots) into benchmarks/RESULTS.md; without it they are printed and kept in a temporary directory"


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (--record writes its table into benchmarks/RESULTS.md)")
    names = p.add_subparsers(dest="bench", required=True)
    e = names.add_parser("engine", help="our engine vs transformers' generate on the same model")
    e.add_argument("--model", default="default")
    e.add_argument("--quick", action="store_true", help="batches 1 and 16, 16 new tokens")
    e.add_argument("--json", default=None, help="write the rows to this JSON file")
    e.add_argument("--record", action="store_true", help=RECORD)
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--repeats", type=int, default=3)
    e.set_defaults(run=run_engine)
    s = names.add_parser("spec", help="static speculative settings (drafter, n) vs plain decoding")
    s.add_argument("--model", default="default")
    s.add_argument("--draft", default=None, help="draft model directory (default: the distilled default draft)")
    s.add_argument("--eagle", default=None, help="eagle head directory (default: the default eagle head)")
    s.add_argument("--drafters", default="ngram,draft", help="comma-separated: ngram, draft, eagle, eagle-treeK (K chains per tree)")
    s.add_argument("--quick", action="store_true", help="batches 1 and 16, n in 1, 2, 4, 8, 32 new tokens")
    s.add_argument("--batches", default=None, help="comma-separated live batch sizes (default 1,4,16,64)")
    s.add_argument("--ns", default=None, help="comma-separated draft lengths (default 1..8)")
    s.add_argument("--temperatures", default=None, help="comma-separated (default 0,1)")
    s.add_argument("--json", default=None)
    s.add_argument("--record", action="store_true", help=RECORD)
    s.add_argument("--repeats", type=int, default=1)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--device", default="cpu", help="cuda: the policy in bfloat16 on the GPU (fast forward, not batch-invariant)")
    s.add_argument("--prompts", default="heldout", choices=("heldout", "train"),
                   help="held-out RL-style prompts (default), or those the default drafters were trained on")
    s.set_defaults(run=run_spec)
    r = names.add_parser("rollout", help="a GRPO-style rollout: plain, static, threshold and adaptive drafting")
    r.add_argument("--model", default="default")
    r.add_argument("--draft", default=None)
    r.add_argument("--quick", action="store_true")
    r.add_argument("--eagle", action="store_true", help="also the default eagle head: static eagle n=1 and eagle-tree n=1 rows, and in adaptive's choice")
    r.add_argument("--json", default=None)
    r.add_argument("--record", action="store_true", help=RECORD)
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--device", default="cpu", help="cuda: the policy in bfloat16 on the GPU (fast forward, not batch-invariant), one instance")
    add_instance_args(r)
    r.set_defaults(run=run_rollout)
    m = names.add_parser("realloc", help="a long-tailed rollout on several instances: reallocation off vs on vs ideal")
    m.add_argument("--model", default="default")
    m.add_argument("--instances", type=int, default=2)
    m.add_argument("--backend", choices=["inproc", "ray"], default="ray")
    m.add_argument("--threads", type=int, default=1, help="torch threads per instance")
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--quick", action="store_true", help="16 samples, 96 new tokens, one run each")
    m.add_argument("--json", default=None)
    m.add_argument("--record", action="store_true", help=RECORD)
    m.set_defaults(run=run_realloc)
    x = names.add_parser("e2e", help="RL iterations with every generation feature off vs on (stage times, speedup)")
    x.add_argument("--config", default=None, help="YAML config (default: the default run, configs/grpo_arith.yaml)")
    x.add_argument("--iterations", type=int, default=4)
    x.add_argument("--compare", choices=("features", "precision", "placement", "sharding", "prompts", "skip", "checkpointing", "logits"), default="features",
                   help="features: generation features off vs on; precision: float32 vs bfloat16 training and generation; "
                        "placement: in-process vs Ray generation actors and trainers; sharding: 2 trainers with the optimizer state "
                        "replicated vs sharded (train.shard_optimizer); prompts: the trainer repeating each "
                        "prompt per sample vs computing it once per group (train.share_prompts); skip: the trainer running every "
                        "sample vs none for samples with zero advantage (train.skip_zero_advantage); checkpointing: the trainer "
                        "keeping every activation vs recomputing each layer in the backward pass (train.gradient_checkpointing); logits: "
                        "the trainer's output layer over all rows at once vs in pieces of 256 recomputed in the backward pass "
                        "(train.logits_chunk)")
    x.add_argument("--json", default=None)
    x.add_argument("--record", action="store_true", help=RECORD)
    x.set_defaults(run=run_e2e, overrides=True)
    t = names.add_parser("steps", help="the engine's step-time table T(batch, tokens per row) for named architectures (random weights)")
    t.add_argument("--models", default="smollm2-135m", help="comma-separated names from rlhfspec/models/catalog.py")
    t.add_argument("--device", default="cpu")
    t.add_argument("--dtype", default=None)
    t.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    t.add_argument("--qs", default="1,2,3,5,9", help="new tokens per row (1 = plain decoding, 1 + n = verifying n drafts)")
    t.add_argument("--context", type=int, default=512)
    t.add_argument("--budget", type=float, default=90.0, help="seconds per model before the batch grid stops growing")
    t.add_argument("--invariant", action="store_true", help="time the batch-invariant forward")
    t.add_argument("--placement", action="store_true", help="also check alone-vs-batched logits bitwise on this device")
    t.add_argument("--json", default=None)
    t.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                   help="instead of measuring: render tables already measured (e.g. by benchmarks/gpu.sh)")
    t.add_argument("--record", action="store_true", help=RECORD)
    t.set_defaults(run=run_steps)
    v = names.add_parser("sim-validate", help="the simulator's predicted wall time of bench rollout and bench realloc vs measured")
    v.add_argument("--full", action="store_true", help="the benches' default sizes (default: their --quick sizes)")
    v.add_argument("--no-realloc", action="store_true", help="skip bench realloc (it starts Ray actors)")
    v.add_argument("--repeats", type=int, default=3, help="steps timed per step-time table cell")
    v.add_argument("--device", default="cpu", help="cuda: bench rollout and the step-time tables on the GPU (needs --no-realloc)")
    v.add_argument("--json", default=None)
    v.add_argument("--record", action="store_true", help=RECORD)
    v.set_defaults(run=run_sim_validate)
    c = names.add_parser("sim-calibrate", help="the simulator's GPU roofline beside published decode step times (cited)")
    c.add_argument("--overhead-ms", type=float, default=1.5, help="the roofline's fixed per-step overhead")
    c.add_argument("--json", default=None)
    c.add_argument("--record", action="store_true", help=RECORD)
    c.set_defaults(run=run_sim_calibrate)
    k = names.add_parser("sim-scale", help="predicted speedup of each generation feature for an 8B and a 70B policy on H100 clusters (simulated)")
    k.add_argument("--scale", type=float, default=1.0, help="fraction of the 512 prompts simulated (speedups barely move with it)")
    k.add_argument("--scenarios", default="8b,70b", help="comma-separated: 8b (8 x 1 H100), 70b (8 x 8 H100)")
    k.add_argument("--profiles", default="eagle3,own", help="acceptance: eagle3 (published EAGLE-3), own (this project's heads)")
    k.add_argument("--lengths", default=None, help="response lengths instead of the cited fit (e.g. lognormal:500,0.6,8192)")
    k.add_argument("--json", default=None)
    k.add_argument("--record", action="store_true", help=RECORD)
    k.set_defaults(run=run_sim_scale)
    f = names.add_parser("refresh", help="drafter acceptance per RL iteration: draft model frozen / refreshed, eagle head refreshed")
    f.add_argument("--config", default=None)
    f.add_argument("--iterations", type=int, default=20)
    f.add_argument("--setting", action="append", default=None, metavar="LABEL=DRAFTER[:frozen]",
                   help="compare these instead (repeat it): DRAFTER is draft, eagle or a draft model or eagle head directory, "
                        "refreshed unless ':frozen' follows it")
    f.add_argument("--json", default=None)
    f.add_argument("--record", action="store_true", help=RECORD)
    f.set_defaults(run=run_refresh, overrides=True)
    q = names.add_parser("trl", help="TRL's GRPOTrainer and rlhfspec on the same job, taking turns (needs pip install -e '.[peers]')")
    q.add_argument("--config", default=None, help="YAML job (default: the default run, configs/grpo_arith.yaml)")
    q.add_argument("--iterations", type=int, default=None, help="iterations on each side (default 4; 2 with --quick)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--trl-micro-batch", type=int, default=None,
                   help="samples per TRL forward (default: as many as fit rlhfspec's train.micro_batch_tokens)")
    q.add_argument("--quick", action="store_true", help="2 iterations of 4 prompts x 4 completions, at most 64 new tokens")
    q.add_argument("--sequential", action="store_true",
                   help="all of rlhfspec's iterations, then all of TRL's (default: interleaved, each pair in ABBA order)")
    q.add_argument("--replay-iterations", type=int, default=1,
                   help="the update check replays rlhfspec's samples of its first N iterations into TRL, one optimizer step each, "
                        "and compares the weights after them (default 1)")
    q.add_argument("--json", default=None)
    q.add_argument("--record", action="store_true", help=RECORD)
    q.set_defaults(run=run_trl, overrides=True)


def run_engine(args) -> int:
    import torch

    from rlhfspec.bench.engine import EngineBenchConfig, run

    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(model=args.model, device=args.device, repeats=args.repeats)
    cfg = EngineBenchConfig.quick(**kw) if args.quick else EngineBenchConfig(**kw)
    run(cfg, json_path=args.json, record=args.record)
    return 0


def run_spec(args) -> int:
    import torch

    from rlhfspec.bench.spec import SpecBenchConfig, run

    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(model=args.model, draft=args.draft, eagle=args.eagle, repeats=args.repeats, device=args.device, prompts=args.prompts,
              drafters=tuple(d.strip() for d in args.drafters.split(",") if d.strip()))
    for name, cast in (("batches", int), ("ns", int), ("temperatures", float)):
        if getattr(args, name):
            kw[name] = tuple(cast(x) for x in getattr(args, name).split(",") if x.strip())
    cfg = SpecBenchConfig.make_quick(**kw) if args.quick else SpecBenchConfig(**kw)
    run(cfg, json_path=args.json, record=args.record)
    return 0


def run_rollout(args) -> int:
    import torch

    from rlhfspec.bench.rollout import RolloutBenchConfig, run

    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(model=args.model, draft=args.draft, instances=args.instances, backend=args.backend,
              realloc=args.realloc == "on", ray_address=args.ray_address, eagle=args.eagle, device=args.device)
    run(RolloutBenchConfig.make_quick(**kw) if args.quick else RolloutBenchConfig(**kw), json_path=args.json, record=args.record)
    return 0


def run_realloc(args) -> int:
    from rlhfspec.bench.realloc import ReallocBenchConfig, run

    kw = dict(model=args.model, instances=args.instances, backend=args.backend, threads=args.threads)
    cfg = ReallocBenchConfig.make_quick(**kw) if args.quick else ReallocBenchConfig(repeats=args.repeats, **kw)
    run(cfg, json_path=args.json, record=args.record)
    return 0


def run_e2e(args) -> int:
    from rlhfspec.bench.e2e import run

    run(args.config, args.iterations, args.extra, json_path=args.json, record=args.record, compare=args.compare)
    return 0


def run_refresh(args) -> int:
    from rlhfspec.bench.refresh import parse_setting, run

    settings = dict(parse_setting(s) for s in args.setting) if args.setting else None
    run(args.config, args.iterations, args.extra, json_path=args.json, record=args.record, settings=settings)
    return 0


def run_trl(args) -> int:
    from rlhfspec.bench.peers import PeersBenchConfig, run

    kw = dict(config=args.config, seed=args.seed, overrides=args.extra, trl_micro_batch=args.trl_micro_batch,
              interleave=not args.sequential, replay_iterations=args.replay_iterations)
    if args.iterations is not None:
        kw["iterations"] = args.iterations
    run(PeersBenchConfig.make_quick(**kw) if args.quick else PeersBenchConfig(**kw), json_path=args.json, record=args.record)
    return 0


def run_steps(args) -> int:
    from rlhfspec.bench.steps import StepsConfig, render, run

    if args.from_json:
        render(args.from_json, record=args.record)
        return 0

    cfg = StepsConfig(models=tuple(args.models.split(",")), device=args.device, dtype=args.dtype,
                      batches=tuple(int(b) for b in args.batches.split(",")), qs=tuple(int(q) for q in args.qs.split(",")),
                      context=args.context, budget_s=args.budget,
                      invariant=args.invariant, placement=args.placement)
    run(cfg, json_path=args.json)
    return 0


def run_sim_validate(args) -> int:
    from rlhfspec.bench.sim_validate import SimValidateConfig, run

    run(SimValidateConfig(full=args.full, realloc=not args.no_realloc, repeats=args.repeats, device=args.device),
        json_path=args.json, record=args.record)
    return 0


def run_sim_calibrate(args) -> int:
    from rlhfspec.bench.sim_calibrate import run

    run(json_path=args.json, record=args.record, overhead_ms=args.overhead_ms)
    return 0


def run_sim_scale(args) -> int:
    from rlhfspec.bench.sim_scale import SimScaleConfig, run

    names = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())
    cfg = SimScaleConfig(scale=args.scale, scenarios=names(args.scenarios), profiles=names(args.profiles))
    if args.lengths:
        cfg.lengths = args.lengths
    run(cfg, json_path=args.json, record=args.record)
    return 0
