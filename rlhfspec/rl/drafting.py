"""Keeping the drafters aligned as the policy drifts: distil draft models and eagle heads on each
iteration's rollouts against the updated policy."""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import torch

from rlhfspec.distill.eagle import EagleConfig, EagleDistiller
from rlhfspec.distill.teacher import teacher_examples
from rlhfspec.distill.train import DistillConfig, Distiller
from rlhfspec.engine.drafters import DraftModelDrafter, Drafter, EagleDrafter


class DraftRefresher:
    """One distiller per draft model or eagle head, made on first use; each trains a float32
    master copy of its weights (the engine's copy may be bf16) and writes it back after every
    refresh. Its state (master weights, optimizer, acceptance references) goes into the RL checkpoint.

    drop None: refresh every iteration. Else a drafter is refreshed only once its measured
    acceptance falls more than `drop` below its reference: the acceptance of the first iteration
    after its last refresh (or of the first iteration).
    """

    def __init__(self, drafters: list[Drafter], seconds: float, drop: float | None = None, max_steps: int = 200):
        self.drafts = [d for d in drafters if isinstance(d, (DraftModelDrafter, EagleDrafter))]
        self.seconds, self.drop, self.max_steps = seconds, drop, max_steps
        self.distillers: dict[str, Distiller] = {}
        self.restored: dict[str, dict] = {}
        self.reference: dict[str, float] = {}

    def _weights(self, d: Drafter) -> torch.nn.Module:
        return d.head if isinstance(d, EagleDrafter) else d.model

    def _distiller(self, d: Drafter, policy) -> Distiller:
        if d.name not in self.distillers:
            live = self._weights(d)
            master = copy.deepcopy(live).float() if live.dtype != torch.float32 else live
            budget = dict(lr=5e-4, seconds=self.seconds, max_steps=self.max_steps, batch_sequences=8)
            if isinstance(d, EagleDrafter):
                distiller = EagleDistiller(master, policy, EagleConfig(**budget))
            else:
                vocab = None if d.vocab is None else d.vocab.tolist()
                distiller = Distiller(master, DistillConfig(**budget), draft_vocab=vocab)
            self.distillers[d.name] = distiller
            saved = self.restored.pop(d.name, None)
            if saved is not None:
                with torch.no_grad():
                    master.load_state_dict(saved["master"])
                distiller.optimizer.load_state_dict(saved["optimizer"])
                if "rng" in saved:  # the batch order and step count go on where they were
                    version, internal, gauss = saved["rng"]
                    distiller.rng.setstate((version, tuple(internal), gauss))
                    distiller.steps = saved["steps"]
        distiller = self.distillers[d.name]
        if isinstance(distiller, EagleDistiller):
            distiller.policy = policy  # the head reads the updated policy's embeddings
        return distiller

    def due(self, name: str, acceptance: float | None) -> bool:
        """Whether a drafter whose acceptance this iteration was `acceptance` needs refreshing now."""
        if self.drop is None:
            return True
        if acceptance is None:
            return False  # it did not draft: nothing measured, nothing to fix
        reference = self.reference.setdefault(name, acceptance)
        return acceptance < reference - self.drop

    def refresh(self, policy, batch, acceptance: dict[str, float] | None = None, seconds: float | None = None) -> dict:
        """Distil the drafters that are due on this iteration's rollouts against the updated policy
        (`acceptance`: this iteration's measured acceptance by drafter name). `seconds`: the whole
        refresh's budget, the teacher's forward included, shared evenly by the drafters due (a
        drafter left no time takes no step); None: each drafter distils for `self.seconds`."""
        out = {}
        due = [d for d in self.drafts if self.due(d.name, (acceptance or {}).get(d.name))]
        if not due:
            return out
        start = time.perf_counter()
        # With a budget the teacher's forward takes at most about half of it, over as many rollouts
        # as that allows: each prompt's first sample, then each one's second, ... (a prompt's
        # samples sit side by side in the batch, and one prompt's rollouts teach much the same).
        nth, seen = [], {}
        for prompt in batch.prompts:
            nth.append(seen.get(tuple(prompt), 0))
            seen[tuple(prompt)] = nth[-1] + 1
        order = sorted(range(len(batch)), key=lambda i: (nth[i], i)) if seconds is not None else range(len(batch))
        seqs = [batch.prompts[i] + batch.completions[i] for i in order]
        features = any(isinstance(d, EagleDrafter) for d in due)
        deadline = None if seconds is None else start + seconds / 2
        examples = teacher_examples(policy, seqs, [len(batch.prompts[i]) for i in order], k=32, features=features, deadline=deadline)
        teacher_s = time.perf_counter() - start
        out["refresh/teacher_sequences"] = len(examples)
        each = self.seconds if seconds is None else (seconds - teacher_s) / len(due)
        for d in due:
            start = time.perf_counter()
            distiller = self._distiller(d, policy)
            if each <= 0:  # the teacher's forward took the whole budget
                out[f"refresh/{d.name}_steps"] = 0
                out[f"refresh/{d.name}_s"] = teacher_s / len(due)
                continue
            distiller.config = replace(distiller.config, seconds=each)
            steps = distiller.steps
            losses = distiller.fit(examples)
            out[f"refresh/{d.name}_steps"] = distiller.steps - steps
            live = self._weights(d)
            if distiller.draft is not live:
                with torch.no_grad():
                    for dst, src in zip(live.parameters(), distiller.draft.parameters()):
                        dst.copy_(src.to(dst.dtype))
            self.reference.pop(d.name, None)  # the next measured acceptance is the new reference
            out[f"refresh/{d.name}_loss"] = sum(losses) / max(len(losses), 1)
            out[f"refresh/{d.name}_s"] = time.perf_counter() - start + teacher_s / len(due)
        return out

    def state_dict(self) -> dict:
        state = {"distillers": dict(self.restored), "reference": dict(self.reference)}
        for name, distiller in self.distillers.items():
            state["distillers"][name] = {"master": {k: v.detach().clone() for k, v in distiller.draft.state_dict().items()},
                                         "optimizer": distiller.optimizer.state_dict(),
                                         "rng": list(distiller.rng.getstate()), "steps": distiller.steps}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Picked up when each distiller is made."""
        if "distillers" not in state:  # a checkpoint from before acceptance references were kept
            state = {"distillers": state, "reference": {}}
        self.restored = dict(state["distillers"])
        self.reference = dict(state["reference"])
