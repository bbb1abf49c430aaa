"""A generation instance: up to `max_batch` live samples over one preallocated KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rlhfspec.engine.drafters.base import Drafter
from rlhfspec.engine.sampling import SAMPLE, SamplingParams, keyed_uniforms, processed_logprobs, sample, seed_tensor
from rlhfspec.engine.sequence import Sequence
from rlhfspec.engine.spec import verify
from rlhfspec.engine.stopping import StopChecker
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.kv_cache import KVCache
from rlhfspec.strategy.base import Decision, StepRecord, Strategy, Workload


@dataclass(slots=True)
class Migrant:
    """A live sample leaving one instance for another: its state, and its KV rows unless the
    destination is to recompute them (policy rows [layers, n, kv_heads, head_dim] each; draft
    models' rows by drafter name)."""

    seq: Sequence
    kv: tuple[torch.Tensor, torch.Tensor] | None = None
    draft_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    acceptance: dict = field(default_factory=dict)  # the strategy's per-sample statistics

    @property
    def nbytes(self) -> int:
        tensors = ([] if self.kv is None else list(self.kv)) + [t for kv in self.draft_kv.values() for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(slots=True)
class InstanceStats:
    steps: int = 0
    prefill_tokens: int = 0
    emitted: int = 0
    proposed: int = 0
    accepted: int = 0
    forward_s: float = 0.0
    records: list[StepRecord] = field(default_factory=list)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def tokens_per_step(self) -> float:
        """Tokens a sample gains per decode step (1 for plain decoding)."""
        slots = sum(r.batch for r in self.records)
        return sum(r.emitted for r in self.records) / slots if slots else 0.0


class GenerationInstance:
    """Live samples occupy slots 0..B-1 (kept dense: a finished sample's slot takes the last one).

    `add` prefills new samples (packed, one forward) and draws their first token; `step` runs one
    batched decode step, speculative when the strategy picks a drafter. Both return the samples
    that finished.
    """

    def __init__(
        self, model, max_batch: int, max_len: int, *, tokenizer=None, eos_ids: tuple[int, ...] | None = None,
        drafters: list[Drafter] | None = None, strategy: Strategy | None = None, batch_invariant: bool = True,
    ):
        if max_batch < 1:
            raise RlhfspecError(f"max_batch is {max_batch}; it must be >= 1.")
        self.model = model
        self.max_batch, self.max_len = max_batch, max_len
        model.ensure_positions(max_len)
        self.cache = KVCache(model.config, max_batch, max_len, model.dtype, model.device, invariant=batch_invariant)
        eos = model.config.eos_token_ids if eos_ids is None else eos_ids
        if tokenizer is not None and tokenizer.eos_token_id is not None and eos_ids is None:
            eos = tuple(sorted(set(eos) | {tokenizer.eos_token_id}))
        self.stopper = StopChecker(eos, tokenizer)
        self.live: list[Sequence] = []
        self.stats = InstanceStats()
        self.drafters: dict[str, Drafter] = {}
        for d in drafters or []:
            d.bind(self)
            self.drafters[d.name] = d
        self.strategy = strategy
        self.started = time.perf_counter()

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
            self.cache.lengths[s.slot] = 0
            self.live.append(s)
        for d in self.drafters.values():
            d.admitted(seqs)
        logits = self.forward([s.slot for s in seqs], [s.prompt for s in seqs], last_only=True)
        self.stats.prefill_tokens += sum(len(s.prompt) for s in seqs)
        tokens, logprobs = self.draw(seqs, logits, [s.length for s in seqs])
        return self._emit(seqs, [[t] for t in tokens], [[lp] for lp in logprobs])

    def workload(self) -> Workload:
        return Workload(
            [s.sample_id for s in self.live], [s.length for s in self.live],
            [s.remaining for s in self.live], list(self.drafters),
        )

    @torch.inference_mode()
    def step(self, decision: Decision | None = None) -> list[Sequence]:
        """One decode step for every live sample (speculative if the decision, or else the strategy,
        names a drafter); returns the samples that finished."""
        if not self.live:
            return []
        seqs = list(self.live)
        if decision is None and self.strategy is not None:
            decision = self.strategy.decide(self.workload())
        if decision is not None and decision.drafter is not None and any(decision.n):
            if decision.drafter not in self.drafters:
                raise RlhfspecError(f"drafter {decision.drafter!r} is not attached; this instance has {sorted(self.drafters) or 'none'}.")
            return self._speculate(seqs, self.drafters[decision.drafter], decision.n)
        t0 = time.perf_counter()
        logits = self.forward(list(range(len(seqs))), [[s.tokens[-1]] for s in seqs], last_only=True)
        tokens, logprobs = self.draw(seqs, logits, [s.length for s in seqs])
        zeros = [0] * len(seqs)
        record = StepRecord(len(seqs), None, zeros, zeros, zeros, len(seqs), 0.0, time.perf_counter() - t0,
                            sum(s.length for s in seqs) / len(seqs), [s.sample_id for s in seqs], t0 - self.started)
        return self._finish_step(record, seqs, [[t] for t in tokens], [[lp] for lp in logprobs])

    def _speculate(self, seqs: list[Sequence], drafter: Drafter, n: list[int]) -> list[Sequence]:
        """Draft, verify every sample's [last, d_1..d_n] in one forward, keep the accepted prefix."""
        if any(k < 0 for k in n):
            raise RlhfspecError(f"draft lengths must be >= 0; got {min(n)}.")
        n = [max(0, min(k, s.remaining - 1)) for s, k in zip(seqs, n)]
        t0 = time.perf_counter()
        proposal = drafter.propose(seqs, n)
        t1 = time.perf_counter()
        before = self.cache.lengths[: len(seqs)]
        logits = self.forward(list(range(len(seqs))), [[s.tokens[-1]] + d for s, d in zip(seqs, proposal.tokens)], last_only=False)
        verdict = verify(seqs, logits, proposal.tokens, proposal.q)
        for b, k in enumerate(verdict.accepted):
            self.cache.lengths[b] = before[b] + 1 + k  # rejected rows become stale (masked)
        drafter.accepted(seqs, proposal.tokens, verdict.accepted)
        drafted = [len(d) for d in proposal.tokens]
        self.stats.proposed += sum(drafted)
        self.stats.accepted += sum(verdict.accepted)
        record = StepRecord(len(seqs), drafter.name, n, drafted, verdict.accepted, sum(len(t) for t in verdict.tokens),
                            t1 - t0, time.perf_counter() - t1, sum(s.length for s in seqs) / len(seqs),
                            [s.sample_id for s in seqs], t0 - self.started)
        return self._finish_step(record, seqs, verdict.tokens, verdict.logprobs)

    def _finish_step(self, record: StepRecord, seqs, tokens, logprobs) -> list[Sequence]:
        self.stats.steps += 1
        self.stats.records.append(record)
        if self.strategy is not None:
            self.strategy.observe(record)
        return self._emit(seqs, tokens, logprobs)

    def forward(self, slots: list[int], new_tokens: list[list[int]], last_only: bool) -> torch.Tensor:
        """Append new_tokens[b] to slots[b] in one packed forward; float32 logits of each sample's
        last row ([B, V]) or of every new row ([sum q, V])."""
        t0 = time.perf_counter()
        q_lens = [len(t) for t in new_tokens]
        attention = self.cache.attend(slots, q_lens)
        flat = torch.tensor([t for ts in new_tokens for t in ts], device=self.cache.device)
        hidden = self.model(flat, attention.positions, attention)
        if last_only and max(q_lens) > 1:
            hidden = hidden[torch.tensor(q_lens, device=hidden.device).cumsum(0) - 1]
        logits = self.model.logits(hidden, attention.invariant)
        self.cache.advance(slots, q_lens)
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

    def _emit(self, seqs: list[Sequence], tokens: list[list[int]], logprobs: list[list[float]]) -> list[Sequence]:
        """Append each sample's emitted tokens, stopping at the first that finishes it."""
        finished = []
        for s, ts, lps in zip(seqs, tokens, logprobs):
            for t, lp in zip(ts, lps):
                s.tokens.append(t)
                s.logprobs.append(lp)
                self.stats.emitted += 1
                s.finish_reason = self.stopper.finish_reason(s)
                if s.finish_reason is not None:
                    finished.append(s)
                    break
        self.release(finished)
        return finished

    def export(self, sample_id: int, with_kv: bool = True) -> Migrant:
        """Take a live sample out of this instance, with its KV rows or without (to be recomputed)."""
        seq = next((s for s in self.live if s.sample_id == sample_id), None)
        if seq is None:
            raise RlhfspecError(f"sample {sample_id} is not live on this instance.")
        migrant = Migrant(seq)
        if self.strategy is not None:
            migrant.acceptance = self.strategy.sample_state(sample_id)
        if with_kv:
            migrant.kv = self.cache.rows(seq.slot)
            for name, d in self.drafters.items():
                rows = d.export_rows(seq.slot) if hasattr(d, "export_rows") else None
                if rows is not None:
                    migrant.draft_kv[name] = rows
        self.release([seq])
        return migrant

    @torch.inference_mode()
    def adopt(self, migrants: list[Migrant]) -> None:
        """Continue samples exported elsewhere: load their KV rows, or recompute them in one packed forward."""
        if len(migrants) > self.free_slots:
            raise RlhfspecError(f"{len(migrants)} migrating samples do not fit: this instance has {self.free_slots} free slots.")
        recompute = []
        for m in migrants:
            s = m.seq
            self.validate(s)
            s.slot = len(self.live)
            self.live.append(s)
            self.cache.lengths[s.slot] = 0
            for d in self.drafters.values():
                d.admitted([s])
            if self.strategy is not None and m.acceptance:
                self.strategy.restore_sample(s.sample_id, m.acceptance)
            if m.kv is not None:
                self.cache.load_rows(s.slot, *m.kv)
                for name, rows in m.draft_kv.items():
                    if name in self.drafters and hasattr(self.drafters[name], "import_rows"):
                        self.drafters[name].import_rows(s.slot, rows)
            else:
                recompute.append(s)
        if recompute:
            # Everything but the last emitted token, which the next step feeds (the cache invariant).
            self.forward([s.slot for s in recompute], [(s.prompt + s.tokens)[:-1] for s in recompute], last_only=True)
            self.stats.prefill_tokens += sum(s.length - 1 for s in recompute)

    def release(self, seqs: list[Sequence]) -> None:
        """Free the samples' slots, moving the last live samples into the holes so slots stay dense."""
        for s in sorted(seqs, key=lambda s: s.slot, reverse=True):
            hole, last = s.slot, len(self.live) - 1
            for d in self.drafters.values():
                d.finished(s, hole)
            if hole != last:
                moved = self.live[last]
                self.cache.move(last, hole)
                for d in self.drafters.values():
                    d.moved(last, hole)
                moved.slot = hole
                self.live[hole] = moved
            else:
                self.cache.lengths[hole] = 0
            self.live.pop()
            s.slot = -1


def _group_by_params(seqs: list[Sequence]) -> dict[SamplingParams, list[int]]:
    groups: dict[SamplingParams, list[int]] = {}
    for r, s in enumerate(seqs):
        groups.setdefault(s.params, []).append(r)
    return groups
