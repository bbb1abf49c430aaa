"""Keeping the draft models aligned as the policy drifts: distil them on each iteration's rollouts."""

from __future__ import annotations

import copy
import time

import torch

from rlhfspec.distill.teacher import teacher_examples
from rlhfspec.distill.train import DistillConfig, Distiller
from rlhfspec.engine.drafters import DraftModelDrafter, Drafter


class DraftRefresher:
    """One distiller per draft model, made on first use; each trains a float32 master copy of its
    draft (the engine's copy may be bf16) and writes it back after every refresh. Its state (master
    weights and optimizer) goes into the RL checkpoint."""

    def __init__(self, drafters: list[Drafter], seconds: float):
        self.drafts = [d for d in drafters if isinstance(d, DraftModelDrafter)]
        self.seconds = seconds
        self.distillers: dict[str, Distiller] = {}
        self.restored: dict[str, dict] = {}

    def _distiller(self, d: DraftModelDrafter) -> Distiller:
        if d.name not in self.distillers:
            master = copy.deepcopy(d.model).float() if d.model.dtype != torch.float32 else d.model
            vocab = None if d.vocab is None else d.vocab.tolist()
            config = DistillConfig(lr=5e-4, seconds=self.seconds, max_steps=200, batch_sequences=8)
            distiller = self.distillers[d.name] = Distiller(master, config, draft_vocab=vocab)
            saved = self.restored.pop(d.name, None)
            if saved is not None:
                with torch.no_grad():
                    master.load_state_dict(saved["master"])
                distiller.optimizer.load_state_dict(saved["optimizer"])
        return self.distillers[d.name]

    def refresh(self, policy, batch) -> dict:
        """Distil each draft model on this iteration's rollouts against the updated policy."""
        out = {}
        for d in self.drafts:
            start = time.perf_counter()
            seqs = [p + c for p, c in zip(batch.prompts, batch.completions)]
            examples = teacher_examples(policy, seqs, [len(p) for p in batch.prompts], k=32)
            distiller = self._distiller(d)
            losses = distiller.fit(examples)
            if distiller.draft is not d.model:
                with torch.no_grad():
                    for dst, src in zip(d.model.parameters(), distiller.draft.parameters()):
                        dst.copy_(src.to(dst.dtype))
            out[f"refresh/{d.name}_loss"] = sum(losses) / max(len(losses), 1)
            out[f"refresh/{d.name}_s"] = time.perf_counter() - start
        return out

    def state_dict(self) -> dict:
        state = dict(self.restored)
        for name, distiller in self.distillers.items():
            state[name] = {"master": {k: v.detach().clone() for k, v in distiller.draft.state_dict().items()},
                           "optimizer": distiller.optimizer.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Picked up when each distiller is made."""
        self.restored = dict(state)
