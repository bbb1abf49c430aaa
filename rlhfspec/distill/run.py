"""The whole distillation job: policy text, teacher targets, training, saving, held-out acceptance."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rlhfspec.data.chat import encode_prompt
from rlhfspec.data.tasks import rl_style_prompts
from rlhfspec.distill.teacher import teacher_examples
from rlhfspec.distill.train import DistillConfig, Distiller, frequent_tokens, new_draft
from rlhfspec.engine.drafters.draft_model import DRAFT_VOCAB_FILE, DraftModelDrafter
from rlhfspec.engine.generate import generate
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.models.checkpoint import save_pretrained


@dataclass
class DistillJob:
    layers: int = 2
    hidden: int = 256
    draft_vocab: int | None = None
    train_prompts: int = 192
    heldout_prompts: int = 24
    max_new_tokens: int = 128
    train_seconds: float = 420.0
    max_steps: int = 600
    top_k: int = 32
    seed: int = 0


def distill_draft(policy, tokenizer, out: str | Path, job: DistillJob, log=print) -> dict:
    """Distill a draft model from the policy and save it (HF format) at `out`; returns a report."""
    t0 = time.perf_counter()
    params = SamplingParams(temperature=1.0, max_new_tokens=job.max_new_tokens)
    texts = rl_style_prompts(job.train_prompts, seed=job.seed)
    prompts = [encode_prompt(tokenizer, t) for t in texts]
    log(f"generating {len(prompts)} policy responses for distillation")
    outs = generate(policy, prompts, params, seed=job.seed, tokenizer=tokenizer, progress=True)
    sequences = [o.prompt_token_ids + o.token_ids for o in outs]
    starts = [len(o.prompt_token_ids) for o in outs]
    t1 = time.perf_counter()
    log(f"{sum(len(o.token_ids) for o in outs)} tokens in {t1 - t0:.0f} s; scoring them with the policy (top-{job.top_k})")
    examples = teacher_examples(policy, sequences, starts, k=job.top_k)
    t2 = time.perf_counter()
    draft = new_draft(policy, job.layers, job.hidden, seed=job.seed)
    vocab = None
    if job.draft_vocab:
        vocab = frequent_tokens(examples, job.draft_vocab, always=tuple(policy.config.eos_token_ids) + tuple(tokenizer.all_special_ids))
    distiller = Distiller(draft, DistillConfig(seconds=job.train_seconds, max_steps=job.max_steps, seed=job.seed), draft_vocab=vocab)
    log(f"training a {job.layers}-layer, {job.hidden}-wide draft ({sum(p.numel() for p in draft.parameters()) / 1e6:.1f} M parameters)")
    losses = distiller.fit(examples, log=log)
    t3 = time.perf_counter()
    out = save_pretrained(draft, out, tokenizer=tokenizer)
    if vocab is not None:
        (out / DRAFT_VOCAB_FILE).write_text(json.dumps(vocab))
    report = {
        "steps": len(losses), "final_loss": losses[-1] if losses else None,
        "generate_s": round(t1 - t0, 1), "teacher_s": round(t2 - t1, 1), "train_s": round(t3 - t2, 1),
        **heldout_acceptance(policy, tokenizer, DraftModelDrafter(draft.to(policy.dtype), policy, draft_vocab=vocab), job),
    }
    (out / "distill_report.json").write_text(json.dumps(report, indent=2))
    report["total_s"] = round(time.perf_counter() - t0, 1)
    log(f"saved {out}; held-out acceptance {report['acceptance']:.1%} at n=4, temperature 1 ({report['total_s']:.0f} s in all)")
    return report


def heldout_acceptance(policy, tokenizer, drafter, job: DistillJob, n: int = 4) -> dict:
    """Acceptance rate and tokens per step of speculative sampling on prompts not used in training."""
    prompts = [encode_prompt(tokenizer, t) for t in rl_style_prompts(job.heldout_prompts, seed=job.seed + 10_000)]
    stats: list = []
    generate(policy, prompts, SamplingParams(temperature=1.0, max_new_tokens=96), seed=job.seed + 1,
             tokenizer=tokenizer, drafter=drafter, num_draft_tokens=n, instance_stats=stats)
    return {"acceptance": stats[0].acceptance, "tokens_per_step": stats[0].tokens_per_step, "heldout_n": n}
