"""Keeping the drafters aligned as the policy drifts: distil draft models and eagle heads on each
iteration's rollouts against the updated policy."""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import fields, replace

import torch

from rlhfspec.distill.eagle import EagleConfig, EagleDistiller
from rlhfspec.distill.teacher import TOP_K, Example, teacher_examples
from rlhfspec.distill.train import DistillConfig, Distiller
from rlhfspec.engine.drafters import DraftModelDrafter, Drafter, EagleDrafter
from rlhfspec.errors import RlhfspecError


def rollout_examples(outputs) -> list[Example]:
    """Examples from the engine's own Traces of finished samples (GenerationOutputs), no forward:
    each sample's text but its last token (whose feature the engine never computed), the top-k
    targets of those response tokens and, where kept, the features of every position. A sample
    without a Trace (resubmitted after its Ray actor died, or from an engine that kept none) is
    left out."""
    out = []
    for o in outputs:
        if o.trace is None or len(o.token_ids) < 2:
            continue
        tokens = list(o.prompt_token_ids) + list(o.token_ids[:-1])
        ids, logprobs = o.trace.targets()
        features = torch.cat(o.trace.features)[: len(tokens)].float() if o.trace.features else None
        out.append(Example(tokens, len(o.prompt_token_ids), ids[: len(o.token_ids) - 1], logprobs[: len(o.token_ids) - 1], features))
    return out


UNROLL_CHAIN = 1.5  # mean drafted chain length from which unroll "auto" trains the second link: mostly chains of 2+


class DraftRefresher:
    """One distiller per draft model or eagle head, made on first use; each trains a float32
    master copy of its weights (the engine's copy may be bf16) and writes it back after every
    refresh. Its state (master weights, optimizer, acceptance references) goes into the RL checkpoint.

    drop None: refresh every iteration. Else a drafter is refreshed only once its measured
    acceptance falls more than `drop` below its reference: the acceptance of the first iteration
    after its last refresh (or of the first iteration).

    targets "teacher": a forward of the updated policy over (part of) the iteration's rollouts
    gives the targets and features. "rollout": the engine's own, kept while it generated (its
    samples' Traces; the policy of one update before), no forward; the refresh trains on the last
    `buffer` iterations' rollouts, kept in its state (of the samples whose id is a multiple of
    `trace_every`, the engine's EngineSpec.trace_every).

    unroll: eagle heads also train a chain's second link, which reads the head's own predicted
    feature (distill.eagle's `unroll`; a step costs about twice as much); "auto": a head does so
    when its drafts in the iteration were UNROLL_CHAIN tokens long or more on average.
    """

    def __init__(self, drafters: list[Drafter], seconds: float, drop: float | None = None, max_steps: int = 200,
                 targets: str = "teacher", buffer: int = 1, unroll: bool | str = "auto", trace_every: int = 1):
        self.drafts = [d for d in drafters if isinstance(d, (DraftModelDrafter, EagleDrafter))]
        self.seconds, self.drop, self.max_steps = seconds, drop, max_steps
        self.targets, self.unroll = targets, unroll
        self.trace_every = trace_every  # the engine's: only samples whose id is a multiple of it keep a Trace
        self.buffer: deque[list[Example]] = deque(maxlen=buffer)
        self.distillers: dict[str, Distiller] = {}
        self.restored: dict[str, dict] = {}
        self.reference: dict[str, float] = {}
        self.teacher_rate: float | None = None  # the last teacher forward's seconds per token

    def _weights(self, d: Drafter) -> torch.nn.Module:
        return d.head if isinstance(d, EagleDrafter) else d.model

    def _distiller(self, d: Drafter, policy) -> Distiller:
        if d.name not in self.distillers:
            live = self._weights(d)
            master = copy.deepcopy(live).float() if live.dtype != torch.float32 else live
            budget = dict(lr=5e-4, seconds=self.seconds, max_steps=self.max_steps, batch_sequences=8)
            if isinstance(d, EagleDrafter):
                distiller = EagleDistiller(master, policy, EagleConfig(**budget))  # unroll set by each refresh
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

    def refresh(self, policy, batch, acceptance: dict[str, float] | None = None, seconds: float | None = None,
                outputs=None, chains: dict[str, float] | None = None) -> dict:
        """Distil the drafters that are due on this iteration's rollouts (`batch`; with targets
        "rollout", `outputs`, the GenerationOutputs with their Traces, go into the buffer first)
        (`acceptance`: this iteration's measured acceptance by drafter name, a drafter absent from it
        drafted nothing and is left as it is; None: every drafter is due; `chains`: its mean
        drafted chain length, which unroll "auto" reads). `seconds`: the whole
        refresh's budget, the teacher's forward included, shared evenly by the drafters due (a
        drafter left no time takes no step); None: each drafter distils for `self.seconds`."""
        out = {}
        if self.targets == "rollout":
            if outputs is None:
                raise RlhfspecError("a refresh from rollout targets needs the rollout's outputs, with their traces.")
            self.buffer.append(rollout_examples(outputs))
            # samples that should have a Trace and lost it (resubmitted after their Ray actor died)
            out["refresh/untraced"] = sum(o.trace is None and o.sample_id % self.trace_every == 0 for o in outputs)
        # A drafter that drafted nothing this iteration (absent from `acceptance`; the selector found
        # it not worth its cost) is not refreshed: its budget would train a head nobody runs.
        idle = [d for d in self.drafts if acceptance is not None and d.name not in acceptance]
        out |= {f"refresh/{d.name}_idle": True for d in idle}
        due = [d for d in self.drafts if d not in idle and self.due(d.name, (acceptance or {}).get(d.name))]
        if not due:
            return out
        start = time.perf_counter()
        if self.targets == "rollout":
            examples = [e for chunk in self.buffer for e in chunk]
            out["refresh/buffer_sequences"] = len(examples)
            return out | self._distil(due, policy, examples, seconds, 0.0, chains)
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
        examples = teacher_examples(policy, seqs, [len(batch.prompts[i]) for i in order], k=TOP_K, features=features,
                                    deadline=deadline, seconds_per_token=self.teacher_rate)
        teacher_s = time.perf_counter() - start
        if examples:
            self.teacher_rate = teacher_s / sum(len(e.tokens) for e in examples)
        out["refresh/teacher_sequences"] = len(examples)
        return out | self._distil(due, policy, examples, seconds, teacher_s, chains)

    def unrolls(self, d: Drafter, chains: dict[str, float] | None) -> bool:
        """Whether eagle head d's refresh trains a chain's second link."""
        if self.unroll == "auto":
            return (chains or {}).get(d.name, 0.0) >= UNROLL_CHAIN
        return bool(self.unroll)

    def _distil(self, due: list[Drafter], policy, examples: list[Example], seconds: float | None, teacher_s: float,
                chains: dict[str, float] | None = None) -> dict:
        """Each drafter due distils on `examples` for its share of what the budget leaves after the
        teacher's `teacher_s` seconds (or `self.seconds` without a budget)."""
        out = {}
        each = self.seconds if seconds is None else (seconds - teacher_s) / len(due)
        for d in due:
            start = time.perf_counter()
            distiller = self._distiller(d, policy)
            if isinstance(distiller, EagleDistiller):
                distiller.config = replace(distiller.config, unroll=self.unrolls(d, chains))
                out[f"refresh/{d.name}_unrolled"] = distiller.config.unroll
            if each <= 0 or not examples:  # the teacher's forward took the whole budget, or had none to take
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
        state = {"distillers": dict(self.restored), "reference": dict(self.reference),
                 "buffer": [[{f.name: getattr(e, f.name) for f in fields(e)} for e in chunk] for chunk in self.buffer]}
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
        self.buffer.clear()
        self.buffer.extend([Example(**e) for e in chunk] for chunk in state.get("buffer", []))
