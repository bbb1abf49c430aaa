"""Drafters for the RL generation stage, and refreshing the draft model as the policy drifts."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from rlhfspec.distill.teacher import teacher_examples
from rlhfspec.distill.train import DistillConfig, Distiller
from rlhfspec.engine.drafters import DraftModelDrafter, Drafter, NgramDrafter
from rlhfspec.errors import RlhfspecError
from rlhfspec.rl.config import GenerationConfig


def build_drafters(gen: GenerationConfig, engine, tokenizer, log=print) -> list[Drafter]:
    """'ngram', 'draft' (the distilled default draft, or generation.draft_path) or a draft checkpoint path."""
    from rlhfspec.bench.spec import default_draft_path

    drafters: list[Drafter] = []
    for spec in gen.drafters:
        if spec == "ngram":
            drafters.append(NgramDrafter())
            continue
        path = Path(gen.draft_path or default_draft_path()) if spec == "draft" else Path(spec)
        if not (path / "model.safetensors").is_file():
            raise RlhfspecError(f"draft model {path} does not exist; create it with: rlhfspec distill-draft --draft-vocab 8192 --out {path}")
        name = "draft" if spec == "draft" else f"draft:{path.name}"
        drafters.append(DraftModelDrafter.load(path, engine, policy_tokenizer=tokenizer, name=name))
        log(f"drafting with {path}")
    return drafters


def _distiller(drafter: DraftModelDrafter, gen: GenerationConfig) -> Distiller:
    """The drafter's distiller, made on first use; it trains a float32 master copy of the draft."""
    if drafter.distiller is None:
        master = copy.deepcopy(drafter.model).float() if drafter.model.dtype != torch.float32 else drafter.model
        vocab = None if drafter.vocab is None else drafter.vocab.tolist()
        drafter.distiller = Distiller(master, DistillConfig(lr=5e-4, seconds=gen.refresh_seconds, max_steps=200, batch_sequences=8), draft_vocab=vocab)
        saved = drafter.restored or {}
        if "master" in saved:
            with torch.no_grad():
                master.load_state_dict(saved["master"])
            drafter.distiller.optimizer.load_state_dict(saved["optimizer"])
    return drafter.distiller


def refresh_drafters(drafters: list[Drafter], policy, batch, gen: GenerationConfig) -> dict:
    """Distill each draft model on this iteration's rollouts against the updated policy."""
    out = {}
    for d in drafters:
        if not isinstance(d, DraftModelDrafter):
            continue
        start = time.perf_counter()
        seqs = [p + c for p, c in zip(batch.prompts, batch.completions)]
        examples = teacher_examples(policy, seqs, [len(p) for p in batch.prompts], k=32)
        distiller = _distiller(d, gen)
        losses = distiller.fit(examples)
        if distiller.draft is not d.model:
            with torch.no_grad():
                for dst, src in zip(d.model.parameters(), distiller.draft.parameters()):
                    dst.copy_(src.to(dst.dtype))
        out[f"refresh/{d.name}_loss"] = sum(losses) / max(len(losses), 1)
        out[f"refresh/{d.name}_s"] = time.perf_counter() - start
    return out
