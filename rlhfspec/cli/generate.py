"""`rlhfspec generate`: complete prompts with the engine and print them with a throughput summary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhfspec.data.chat import encode_prompt
from rlhfspec.data.sources import check_row
from rlhfspec.data.prompts import DEMO_PROMPTS
from rlhfspec.engine.spec import DEFAULT_MAX_BATCH, EngineSpec, check_drafter, drafter_spec, strategy_spec
from rlhfspec.errors import RlhfspecError
from rlhfspec.rollout.generate import Placement


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete prompts with the generation engine")
    p.add_argument("--model", default="default", help="'default', a Hugging Face directory or a .gguf file")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); chat-templated unless --raw")
    p.add_argument("--prompts-file", type=Path, help="JSONL with a 'prompt' (string) or 'messages' (chat) field per line")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--batch-size", type=int, default=None, help="live samples at once (default: all, up to 64)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the device's generation default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--drafter", default="none", help="none, ngram, draft (the distilled default draft), eagle (the default eagle head), "
                   "or a draft model or eagle head directory")
    p.add_argument("--num-draft-tokens", type=draft_tokens, default=4,
                   help="draft tokens per step when a drafter is set, or 'auto' (the adaptive strategy picks drafter and n)")
    p.add_argument("--strategy", choices=["static", "threshold", "adaptive"], default=None,
                   help="static: n drafts every step (default); threshold: only while the live batch <= --threshold-batch; "
                        "adaptive: the selector picks drafter and n per step")
    p.add_argument("--threshold-batch", type=int, default=32)
    p.add_argument("--json", type=Path, help="also write the completions to this JSONL file")
    p.add_argument("--batch-invariant", choices=["on", "off"], default="on",
                   help="on: a sample's tokens never depend on its batch or instance; off: faster kernels (see README)")
    add_instance_args(p)
    p.set_defaults(run=run)


def draft_tokens(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither an integer nor 'auto'") from None


def add_instance_args(p) -> None:
    p.add_argument("--instances", type=int, default=1, help="generation instances the samples are spread over")
    p.add_argument("--backend", choices=["inproc", "ray"], default="inproc",
                   help="inproc: instances in this process, stepped in turn; ray: one Ray actor each")
    p.add_argument("--realloc", choices=["off", "on"], default="on", help="migrate in-flight samples between instances")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")


def read_prompts_file(path: Path) -> list:
    """Prompts from JSONL: each line holds 'prompt' (text) or 'messages' (chat turns)."""
    if not path.is_file():
        raise RlhfspecError(f"prompts file {path} does not exist.")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RlhfspecError(f"{path} line {n} is not valid JSON ({e.msg}).") from None
        prompts.append(check_row(row, f"{path} line {n}")["prompt"])
    return prompts


def run(args) -> int:
    import torch

    from rlhfspec import SamplingParams, load_model
    from rlhfspec.rollout.generate import run_generation

    # Every setting is checked before the model loads.
    if args.instances < 1:
        raise RlhfspecError(f"--instances must be at least 1, got {args.instances}.")
    if args.samples < 1:
        raise RlhfspecError(f"--samples is {args.samples}; it must be at least 1.")
    if args.batch_size is not None and args.batch_size < 1:
        raise RlhfspecError(f"--batch-size is {args.batch_size}; it must be at least 1.")
    if args.threads is not None and args.threads < 1:
        raise RlhfspecError(f"--threads is {args.threads}; it must be at least 1.")
    if args.json and not args.json.parent.is_dir():
        raise RlhfspecError(f"--json {args.json}: directory {args.json.parent} does not exist.")
    spec, placement = engine_args(args)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, stop=tuple(args.stop),
    )
    texts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not texts and (args.prompt or args.prompts_file):
        raise RlhfspecError(f"prompts file {args.prompts_file} holds no prompts.")
    texts = texts or DEMO_PROMPTS  # no prompts asked for: the demo prompts
    for i, t in enumerate(texts):
        if isinstance(t, str) and not t.strip():
            raise RlhfspecError(f"prompt {i} is empty; every prompt needs some text.")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if tok is None:
        raise RlhfspecError(f"{args.model} has no tokenizer files; rlhfspec generate needs one to encode prompts.")
    encoded = [encode_prompt(tok, t, chat=not args.raw) for t in texts]
    prompts = [p for p in encoded for _ in range(args.samples)]
    result = run_generation(spec, prompts, params, args.seed, placement=placement, model=model, tokenizer=tok,
                            progress=True)
    outs, stats = result.outputs, result.stats
    elapsed = result.seconds
    rows = []
    for i, out in enumerate(outs):
        text = tok.decode(out.token_ids, skip_special_tokens=True)
        prompt = texts[i // args.samples]
        print(f"### [{i}] {prompt if isinstance(prompt, str) else prompt[-1]['content']}\n{text}\n")
        rows.append({"prompt": prompt, "completion": text, "token_ids": out.token_ids, "finish_reason": out.finish_reason})
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens = sum(len(o.token_ids) for o in outs)
    line = f"{len(outs)} samples, {tokens} tokens in {elapsed:.1f} s: {tokens / elapsed:.1f} tok/s"
    if args.instances > 1 or args.backend == "ray":
        line += f", {args.instances} {args.backend} instances, {len(result.timeline.moves)} migrations"
    elif spec.drafters:
        line += f", acceptance {stats[0].acceptance or 0:.1%}, {stats[0].tokens_per_step:.2f} tokens/step per sample"
    print(f"{line} ({model.dtype}, {torch.get_num_threads()} threads)")
    return 0


def engine_args(args) -> tuple[EngineSpec, Placement]:
    """The engine spec and placement the command line describes (checked before the model loads)."""
    if args.drafter != "none":
        check_drafter(args.drafter, "--drafter")
    drafters = () if args.drafter == "none" else (drafter_spec(args.drafter),)
    if args.num_draft_tokens == "auto" and args.strategy not in (None, "adaptive"):
        raise RlhfspecError(f"--num-draft-tokens auto means the adaptive strategy; it cannot go with --strategy {args.strategy}.")
    kind = "adaptive" if args.num_draft_tokens == "auto" else args.strategy or "static"
    n = 4 if args.num_draft_tokens == "auto" else args.num_draft_tokens
    strategy = strategy_spec(kind, drafters, n, args.threshold_batch, required=kind == "adaptive")
    spec = EngineSpec(drafters, strategy, args.batch_size or DEFAULT_MAX_BATCH, dtype=args.dtype, threads=args.threads,
                      batch_invariant=args.batch_invariant == "on", model=args.model)
    return spec, Placement(args.instances, args.backend, realloc=args.realloc == "on", ray_address=args.ray_address)
