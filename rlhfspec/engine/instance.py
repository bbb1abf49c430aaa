"""A generation instance: up to `max_batch` live samples over one preallocated KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlhfspec.engine.sampling import SAMPLE, SamplingParams, keyed_uniforms, processed_logprobs, sample, seed_tensor
from rlhfspec.engine.sequence import Sequence
from rlhfspec.engine.stopping import StopChecker
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.kv_cache import KVCache


@dataclass(slots=True)
class InstanceStats:
    steps: int = 0
    prefill_tokens: int = 0
    emitted: int = 0
    forward_s: float = 0.0


class GenerationInstance:
    """Live samples occupy slots 0..B-1 (kept dense: a finished sample's slot takes the last one).

    `add` prefills new samples (packed, one forward) and draws their first token; `step` runs one
    batched decode step for all live samples. Both return the samples that finished.
    """

    def __init__(self, model, max_batch: int, max_len: int, *, tokenizer=None, eos_ids: tuple[int, ...] | None = None):
        if max_batch < 1:
            raise RlhfspecError(f"max_batch is {max_batch}; it must be >= 1.")
        self.model = model
        self.max_batch, self.max_len = max_batch, max_len
        model.ensure_positions(max_len)
        self.cache = KVCache(model.config, max_batch, max_len, model.dtype, model.device)
        eos = model.config.eos_token_ids if eos_ids is None else eos_ids
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = tuple(sorted(set(eos) | {tokenizer.eos_token_id}))
        self.stopper = StopChecker(eos, tokenizer)
        self.live: list[Sequence] = []
        self.stats = InstanceStats()

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.live)

    def validate(self, seq: Sequence) -> None:
        """A clear error for a sample this instance cannot run."""
        if not seq.prompt:
            raise RlhfspecError(f"prompt {seq.sample_id} is empty; every prompt needs at least one token.")
        need = len(seq.prompt) + seq.params.max_new_tokens
        if need > self.max_len:
            raise RlhfspecError(
                f"prompt {seq.sample_id} is {len(seq.prompt)} tokens; with max_new_tokens {seq.params.max_new_tokens} "
                f"it needs {need} positions but max_len is {self.max_len}."
            )
        vocab = self.model.config.vocab_size
        bad = next((t for t in seq.prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise RlhfspecError(f"prompt {seq.sample_id} holds token id {bad}, outside the vocabulary [0, {vocab}).")
        self.stopper.check_params(seq)

    @torch.inference_mode()
    def add(self, seqs: list[Sequence]) -> list[Sequence]:
        """Prefill new samples into free slots and draw their first token; returns those already finished."""
        if len(seqs) > self.free_slots:
            raise RlhfspecError(
                f"{len(seqs)} samples do not fit: this instance has {self.free_slots} free slots of max_batch {self.max_batch}."
            )
        for s in seqs:
            self.validate(s)
        if not seqs:
            return []
        first = len(self.live)
        for i, s in enumerate(seqs):
            s.slot = first + i
            self.live.append(s)
        logits = self.forward(first, [s.prompt for s in seqs], last_only=True)
        self.stats.prefill_tokens += sum(len(s.prompt) for s in seqs)
        tokens, logprobs = self.draw(seqs, logits, [s.length for s in seqs])
        return self._emit(seqs, tokens, logprobs)

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One decode step for every live sample; returns the samples that finished."""
        if not self.live:
            return []
        seqs = list(self.live)
        logits = self.forward(0, [[s.tokens[-1]] for s in seqs], last_only=True)
        tokens, logprobs = self.draw(seqs, logits, [s.length for s in seqs])
        self.stats.steps += 1
        return self._emit(seqs, tokens, logprobs)

    def forward(self, first_slot: int, new_tokens: list[list[int]], last_only: bool) -> torch.Tensor:
        """Append new_tokens[b] to slot first_slot+b in one packed forward; float32 logits of each
        sample's last row ([B, V]) or of every new row ([sum q, V])."""
        t0 = time.perf_counter()
        q_lens = [len(t) for t in new_tokens]
        attention = self.cache.attend(first_slot, q_lens)
        flat = torch.tensor([t for ts in new_tokens for t in ts], device=self.cache.device)
        hidden = self.model(flat, attention.positions, attention)
        if last_only and max(q_lens) > 1:
            hidden = hidden[torch.tensor(q_lens, device=hidden.device).cumsum(0) - 1]
        logits = self.model.logits(hidden)
        self.cache.advance(first_slot, q_lens)
        self.stats.forward_s += time.perf_counter() - t0
        return logits

    def draw(self, seqs: list[Sequence], logits: torch.Tensor, positions: list[int], purpose: int = SAMPLE) -> tuple[list[int], list[float]]:
        """Sample row r of logits for seqs[r] at full-sequence position positions[r]."""
        dev = logits.device
        tokens = torch.empty(len(seqs), dtype=torch.long, device=dev)
        logprobs = torch.empty(len(seqs), dtype=torch.float32, device=dev)
        for params, rows in _group_by_params(seqs).items():
            idx = torch.tensor(rows, device=dev) if len(rows) < len(seqs) else None
            lp = processed_logprobs(logits if idx is None else logits[idx], params)
            group = [seqs[r] for r in rows]
            u = keyed_uniforms(
                seed_tensor([s.seed for s in group], dev),
                torch.tensor([s.sample_id for s in group], device=dev),
                torch.tensor([positions[r] for r in rows], device=dev),
                purpose,
            )
            tok = sample(lp, u, params.greedy)
            chosen = lp.gather(-1, tok[:, None]).squeeze(-1)
            if idx is None:
                tokens, logprobs = tok, chosen
            else:
                tokens[idx], logprobs[idx] = tok, chosen
        return tokens.tolist(), logprobs.tolist()

    def _emit(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float]) -> list[Sequence]:
        finished = []
        for s, t, lp in zip(seqs, tokens, logprobs):
            s.tokens.append(t)
            s.logprobs.append(lp)
            self.stats.emitted += 1
            s.finish_reason = self.stopper.finish_reason(s)
            if s.finish_reason is not None:
                finished.append(s)
        self.release(finished)
        return finished

    def release(self, seqs: list[Sequence]) -> None:
        """Free the samples' slots, moving the last live samples into the holes so slots stay dense."""
        for s in sorted(seqs, key=lambda s: s.slot, reverse=True):
            hole, last = s.slot, len(self.live) - 1
            if hole != last:
                moved = self.live[last]
                self.cache.move(last, hole)
                self.on_move(last, hole)
                moved.slot = hole
                self.live[hole] = moved
            else:
                self.cache.lengths[hole] = 0
            self.live.pop()
            s.slot = -1

    def on_move(self, src: int, dst: int) -> None:
        """Hook for state kept per slot beside the KV cache (drafters)."""


def _group_by_params(seqs: list[Sequence]) -> dict[SamplingParams, list[int]]:
    groups: dict[SamplingParams, list[int]] = {}
    for r, s in enumerate(seqs):
        groups.setdefault(s.params, []).append(r)
    return groups
