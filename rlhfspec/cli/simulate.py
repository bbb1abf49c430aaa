"""`rlhfspec simulate`: a rollout on a simulated cluster, each generation feature alone and together."""

from __future__ import annotations

from rlhfspec.sim.ablation import SimConfig

_D = SimConfig()


def register(sub) -> None:
    p = sub.add_parser("simulate", help="simulate one rollout on K instances of a GPU (roofline) or a measured step-time table")
    c = p.add_argument_group("cost")
    c.add_argument("--table", default=None, help="a measured step-time table (the engine's profile JSON or bench steps' JSON) instead of a roofline")
    c.add_argument("--table-model", default=None, help="which model of a bench steps JSON")
    c.add_argument("--accelerator", default=_D.accelerator, help="H100, H200, A100 or B200")
    c.add_argument("--model", default=_D.model, help="7B, 8B, 14B, 32B, 70B, a catalog name, or a config.json")
    c.add_argument("--tp", type=int, default=_D.tp, help="tensor-parallel GPUs per instance")
    c.add_argument("--draft-model", default=_D.draft_model, help="architecture of the 'draft' drafter (an 'eagle' drafter is one layer of the policy)")
    c.add_argument("--bytes-per-param", type=float, default=_D.bytes_per_param, help="weights and KV cache: 2 (bf16) or 1 (fp8)")
    c.add_argument("--overhead-ms", type=float, default=_D.overhead_ms, help="fixed per-step overhead")
    k = p.add_argument_group("cluster")
    k.add_argument("--instances", type=int, default=_D.instances)
    k.add_argument("--max-batch", type=int, default=_D.max_batch, help="live samples per instance")
    k.add_argument("--steps-per-call", type=int, default=None, help="steps between reports (default 1 for one instance, else 4)")
    k.add_argument("--migration", choices=("auto", "kv", "recompute"), default=_D.migration)
    k.add_argument("--link-gb-per-s", type=float, default=_D.link_gb_per_s, help="bandwidth between instances (KV migration)")
    w = p.add_argument_group("workload")
    w.add_argument("--prompts", type=int, default=_D.prompts)
    w.add_argument("--samples", type=int, default=_D.samples, help="samples per prompt")
    w.add_argument("--lengths", default=_D.lengths, help="response lengths: N, lognormal:MEDIAN,SIGMA,CAP, or a trace file")
    w.add_argument("--max-new-tokens", type=int, default=None, help="default: the lognormal CAP or the trace's longest")
    w.add_argument("--prompt-len", default=_D.prompt_len, help="prompt lengths: N, lognormal:MEDIAN,SIGMA,CAP, or a trace file")
    w.add_argument("--acceptance", default=_D.acceptance,
                   help="per-position acceptance per drafter: 'draft=0.8,0.7;ngram=0.3', or a JSON file {drafter: [p1, p2, ...]}")
    w.add_argument("--static-n", default=",".join(map(str, _D.static_n)), help="static draft lengths tried (the best is reported)")
    w.add_argument("--max-n", type=int, default=_D.max_n, help="the adaptive selector's largest draft length")
    w.add_argument("--seed", type=int, default=_D.seed)
    p.add_argument("--json", default=None, help="write the rows (and utilisation curves) to this JSON file")
    p.add_argument("--plot", default="simulate_timeline.png", help="the timeline PNG ('' for none)")
    p.set_defaults(run=run)


def run(args) -> int:
    from rlhfspec.errors import RlhfspecError
    from rlhfspec.sim.ablation import ablation, markdown, write_outputs

    try:
        static_n = tuple(int(x) for x in args.static_n.split(","))
    except ValueError:
        raise RlhfspecError(f"--static-n {args.static_n!r} is not a comma-separated list of integers.") from None
    fields = ("table", "table_model", "accelerator", "model", "tp", "draft_model", "bytes_per_param", "overhead_ms", "instances",
              "max_batch", "steps_per_call", "migration", "link_gb_per_s", "prompts", "samples", "lengths", "max_new_tokens",
              "prompt_len", "acceptance", "max_n", "seed")
    cfg = SimConfig(static_n=static_n, **{f: getattr(args, f) for f in fields})
    result = ablation(cfg)
    print()
    print(markdown(result))
    for path in write_outputs(result, args.json, args.plot or None, cfg.instances):
        print(f"wrote {path}")
    return 0
