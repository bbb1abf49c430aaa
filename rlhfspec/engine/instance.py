"""A generation instance: up to `max_batch` live samples over one preallocated KV cache."""

from __future__ import annotations

import time
import torch

from rlhfspec.engine.drafters.base import Drafter
from rlhfspec.engine.sampling import SAMPLE, group_rows, processed_logprobs, sample
from rlhfspec.engine.report import InstanceReport, InstanceStats, Migrant
from rlhfspec.engine.sequence import Sequence, Trace, prefill_leaders, uniforms
from rlhfspec.engine.spec import MAX_DRAFT_TOKENS
from rlhfspec.engine.tree import tree_rows, verify_tree
from rlhfspec.engine.verify import verify
from rlhfspec.engine.stopping import StopChecker
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.kv_cache import KVCache
from rlhfspec.strategy.base import Decision, StepRecord, Strategy, Workload, clipped_draft_lengths


class GenerationInstance:
    """Live samples occupy slots 0..B-1 (kept dense: a finished sample's slot takes the last one).

    `add` prefills new samples (packed, one forward) and draws their first token; `step` runs one
    batched decode step, speculative when the strategy picks a drafter. Both return the samples
    that finished.
    """

    def __init__(
        self, model, max_batch: int, max_len: int, *, tokenizer=None, eos_ids: tuple[int, ...] | None = None,
        drafters: list[Drafter] | None = None, strategy: Strategy | None = None, batch_invariant: bool = True,
        keep_targets: int = 0, trace_every: int = 1,
    ):
        if max_batch < 1:
            raise RlhfspecError(f"max_batch is {max_batch}; it must be >= 1.")
        if batch_invariant and model.dtype not in (torch.float32, torch.bfloat16):
            raise RlhfspecError(f"the batch-invariant engine runs float32 and bfloat16 models, and this one is {str(model.dtype).removeprefix('torch.')}; "
                                "load it in float32 or bfloat16, or turn batch invariance off (--batch-invariant off, generation.batch_invariant false).")
        self.model = model
        self.max_batch, self.max_len = max_batch, max_len
        model.ensure_positions(max_len)
        # A tree's rejected branches take rows past the accepted path's: room for the widest tree.
        spare = max([(d.branches - 1) * MAX_DRAFT_TOKENS for d in drafters or []], default=0)
        self.cache = KVCache(model.config, max_batch, max_len + spare, model.dtype, model.device, invariant=batch_invariant)
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
        self.readers = [d for d in self.drafters.values() if d.reads_features]
        self.keep_targets = keep_targets  # k > 0: samples keep a Trace of top-k targets and features,
        self.trace_every = trace_every  # those whose sample_id is a multiple of trace_every
        self.strategy = strategy
        self.kv_bytes_per_token = float(self.cache.bytes_per_token + sum(d.kv_bytes_per_token for d in self.drafters.values()))
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

    def check(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            self.validate(s)

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
        t0 = time.perf_counter()
        first = len(self.live)
        for i, s in enumerate(seqs):
            s.slot = first + i
            s.trace = Trace() if self.keep_targets and s.sample_id % self.trace_every == 0 else None
            self.cache.lengths[s.slot] = 0
            self.live.append(s)
        for d in self.drafters.values():
            d.admitted(seqs)
        leader, prefilled = prefill_leaders(seqs)
        logits, hidden = self._forward([s.slot for s in prefilled], [s.prompt for s in prefilled], last_only=True)
        if len(prefilled) < len(seqs):
            logits, hidden = self._share_prefill(seqs, leader, prefilled, logits, hidden)
        self._observe(seqs, hidden, [len(s.prompt) for s in seqs])
        self.stats.prefill_tokens += sum(len(s.prompt) for s in prefilled)
        self.stats.shared_prefill_tokens += sum(len(s.prompt) for s in seqs) - sum(len(s.prompt) for s in prefilled)
        tokens, logprobs = self.draw(seqs, logits, [s.length for s in seqs])
        targets = self._targets(logits)
        self.stats.prefill_s += time.perf_counter() - t0
        return self._emit(seqs, [[t] for t in tokens], [[lp] for lp in logprobs], targets)

    def _share_prefill(self, seqs, leader: list[int], prefilled, logits: torch.Tensor, hidden: torch.Tensor | None):
        """Give each sample whose prompt an earlier one prefilled that sample's KV rows, last-row
        logits and features. No bit changes on the batch-invariant path, where a row never
        depends on what else a forward holds; each sample still draws its own tokens."""
        row = {i: r for r, i in enumerate(i for i in range(len(seqs)) if leader[i] == i)}
        for i, s in enumerate(seqs):
            if leader[i] != i:
                self.cache.copy(seqs[leader[i]].slot, s.slot)
        logits = logits[torch.tensor([row[leader[i]] for i in range(len(seqs))], device=logits.device)]
        if hidden is not None:
            chunks = hidden.split([len(s.prompt) for s in prefilled])
            hidden = torch.cat([chunks[row[leader[i]]] for i in range(len(seqs))])
        return logits, hidden

    def workload(self) -> Workload:
        return Workload.of(self.live, self.drafters, {name: d.branches for name, d in self.drafters.items()})

    @torch.inference_mode()
    def step(self, decision: Decision | None = None) -> list[Sequence]:
        """One decode step for every live sample (speculative if the decision, or else the strategy,
        names a drafter); returns the samples that finished. The strategy's decision time is part
        of the step's record."""
        if not self.live:
            return []
        seqs = list(self.live)
        t0 = time.perf_counter()
        if decision is None and self.strategy is not None:
            decision = self.strategy.decide(self.workload())
        decide_s = time.perf_counter() - t0
        if decision is not None and decision.drafter is not None and any(decision.n):
            if decision.drafter not in self.drafters:
                raise RlhfspecError(f"drafter {decision.drafter!r} is not attached; this instance has {sorted(self.drafters) or 'none'}.")
            return self._speculate(seqs, self.drafters[decision.drafter], decision.n, t0, decide_s)
        t1 = time.perf_counter()
        logits, hidden = self._forward(list(range(len(seqs))), [[s.tokens[-1]] for s in seqs], last_only=True)
        self._observe(seqs, hidden, [1] * len(seqs))
        tokens, logprobs = self.draw(seqs, logits, [s.length for s in seqs])
        targets = self._targets(logits)
        zeros = [0] * len(seqs)
        record = StepRecord(len(seqs), None, zeros, zeros, zeros, len(seqs), 0.0, time.perf_counter() - t1,
                            sum(s.length for s in seqs) / len(seqs), [s.sample_id for s in seqs], t0 - self.started, decide_s=decide_s)
        return self._finish_step(record, seqs, [[t] for t in tokens], [[lp] for lp in logprobs], targets)

    def _speculate(self, seqs: list[Sequence], drafter: Drafter, n: list[int], t0: float, decide_s: float) -> list[Sequence]:
        """Draft, verify every sample's [last, d_1..d_n] (or tree, for a branching drafter) in one
        forward, keep the accepted path."""
        if any(k < 0 for k in n):
            raise RlhfspecError(f"draft lengths must be >= 0; got {min(n)}.")
        n = clipped_draft_lengths(n, [s.remaining for s in seqs])
        t_draft = time.perf_counter()
        proposal = drafter.propose(seqs, n)
        t1 = time.perf_counter()
        before = self.cache.lengths[: len(seqs)]
        k = proposal.branches
        depths = [len(d) // k for d in proposal.tokens]
        fed = [[s.tokens[-1]] + d for s, d in zip(seqs, proposal.tokens)]
        if k == 1:
            logits, hidden = self._forward(list(range(len(seqs))), fed, last_only=False)
            verdict = verify(seqs, logits, proposal.tokens, proposal.q)
            paths = [list(range(a + 1)) for a in verdict.accepted]
            for b, a in enumerate(verdict.accepted):
                self.cache.lengths[b] = before[b] + 1 + a  # rejected rows become stale (masked)
        else:
            logits, hidden = self._forward(list(range(len(seqs))), fed, last_only=False, tree=tree_rows(before, depths, k))
            verdict, paths = verify_tree(seqs, logits, proposal.tokens, proposal.q, k)
            for b, path in enumerate(paths):
                self.cache.keep(b, before[b], [before[b] + r for r in path])
        drafter.accepted(seqs, proposal.tokens, verdict.accepted)
        self._observe(seqs, hidden, [len(t) for t in fed], paths)
        offsets = [0, *torch.tensor([len(t) for t in fed]).cumsum(0).tolist()]
        targets = self._targets(logits, [[offsets[b] + r for r in path] for b, path in enumerate(paths)])
        self.stats.proposed += sum(depths)
        self.stats.accepted += sum(verdict.accepted)
        record = StepRecord(len(seqs), drafter.name, n, depths, verdict.accepted, sum(len(t) for t in verdict.tokens),
                            t1 - t_draft, time.perf_counter() - t1, sum(s.length for s in seqs) / len(seqs),
                            [s.sample_id for s in seqs], t0 - self.started, decide_s=decide_s, branches=k)
        return self._finish_step(record, seqs, verdict.tokens, verdict.logprobs, targets)

    def _finish_step(self, record: StepRecord, seqs, tokens, logprobs, targets) -> list[Sequence]:
        self.stats.record(record)
        if self.strategy is not None:
            self.strategy.observe(record)
        return self._emit(seqs, tokens, logprobs, targets)

    def _targets(self, logits: torch.Tensor, rows: list[list[int]] | None = None) -> list | None:
        """With keep_targets k: per sample, (top-k ids, their logprobs at temperature 1) on the CPU
        of its rows of `logits` (rows[b], default row b), the distributions its emitted tokens are
        drawn from, in order. None otherwise."""
        if not self.keep_targets:
            return None
        if rows is not None:
            logits = logits[torch.tensor([r for rs in rows for r in rs], device=logits.device)]
        top = logits.topk(self.keep_targets, dim=-1)
        logprobs = (top.values - logits.logsumexp(-1, keepdim=True)).float().cpu()
        sizes = [1] * len(logits) if rows is None else [len(rs) for rs in rows]
        return list(zip(top.indices.cpu().split(sizes), logprobs.split(sizes)))

    def forward(self, slots: list[int], new_tokens: list[list[int]], last_only: bool) -> torch.Tensor:
        """Append new_tokens[b] to slots[b] in one packed forward; float32 logits of each sample's
        last row ([B, V]) or of every new row ([sum q, V])."""
        return self._forward(slots, new_tokens, last_only)[0]

    def _forward(self, slots: list[int], new_tokens: list[list[int]], last_only: bool, tree=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward`'s logits (new rows laid out as `tree`, if given), and the hidden states of
        every new row ([sum q, H]) when a drafter reads them (else None)."""
        t0 = time.perf_counter()
        keep = bool(self.readers)
        hidden = self.cache.forward(self.model, slots, new_tokens, last_only and not keep, tree=tree)
        rows = hidden
        if keep and last_only and max(len(t) for t in new_tokens) > 1:
            rows = hidden[torch.tensor([len(t) for t in new_tokens], device=hidden.device).cumsum(0) - 1]
        logits = self.model.logits(rows, self.cache.invariant)
        self.stats.forward_s += time.perf_counter() - t0
        return logits, hidden if keep else None

    def _observe(self, seqs: list[Sequence], hidden: torch.Tensor | None, fed: list[int], kept: list[list[int]] | None = None,
                 trace: bool = True) -> None:
        """Hand the drafters that read features the hidden states of the rows the policy's cache
        keeps: of the fed[b] rows of seqs[b] in `hidden`, those at kept[b] (default all), in order;
        with keep_targets (and `trace`) each sample's Trace keeps their features too."""
        if hidden is None:
            return
        features, start = [], 0
        for b, f in enumerate(fed):
            rows = hidden[start : start + f]
            if kept is not None:  # ascending rows from 0: a prefix unless a tree's path skips some
                path = kept[b]
                rows = rows[: len(path)] if path[-1] == len(path) - 1 else rows[torch.tensor(path, device=rows.device)]
            features.append(rows)
            start += f
        for d in self.readers:
            d.observe(seqs, features)
        if self.keep_targets and trace:
            for s, rows in zip(seqs, features):
                if s.trace is not None:  # None: a sample recovered from a lost instance, its Trace lost with it
                    s.trace.features.append(self.model.normed(rows).cpu())

    def draw(self, seqs: list[Sequence], logits: torch.Tensor, positions: list[int], purpose: int = SAMPLE) -> tuple[list[int], list[float]]:
        """Sample row r of logits for seqs[r] at full-sequence position positions[r]."""
        dev = logits.device
        tokens = torch.empty(len(seqs), dtype=torch.long, device=dev)
        logprobs = torch.empty(len(seqs), dtype=torch.float32, device=dev)
        for params, rows in group_rows([s.params for s in seqs]).items():
            idx = torch.tensor(rows, device=dev) if len(rows) < len(seqs) else None
            lp = processed_logprobs(logits if idx is None else logits[idx], params)
            u = uniforms([seqs[r] for r in rows], [positions[r] for r in rows], purpose, dev)
            tok = sample(lp, u, params.greedy)
            chosen = lp.gather(-1, tok[:, None]).squeeze(-1)
            if idx is None:
                tokens, logprobs = tok, chosen
            else:
                tokens[idx], logprobs[idx] = tok, chosen
        return tokens.tolist(), logprobs.tolist()

    def _emit(self, seqs: list[Sequence], tokens: list[list[int]], logprobs: list[list[float]], targets: list | None = None) -> list[Sequence]:
        """Append each sample's emitted tokens, stopping at the first that finishes it (and to its
        Trace the targets of those it appended)."""
        finished = []
        for b, (s, ts, lps) in enumerate(zip(seqs, tokens, logprobs)):
            appended = 0
            for t, lp in zip(ts, lps):
                s.tokens.append(t)
                s.logprobs.append(lp)
                appended += 1
                self.stats.emitted += 1
                s.finish_reason = self.stopper.finish_reason(s)
                if s.finish_reason is not None:
                    finished.append(s)
                    break
            if targets is not None and s.trace is not None:
                ids, top = targets[b]
                s.trace.top_ids.append(ids[:appended])
                s.trace.top_logprobs.append(top[:appended])
        for s in finished:
            if s.trace is not None:
                s.trace.compact()
        self.release(finished)
        return finished

    def run(self, steps: int) -> InstanceReport:
        """Up to `steps` decode steps (fewer if the instance empties), then a report."""
        finished: list[Sequence] = []
        start, done = time.perf_counter(), 0
        while done < steps and self.live:
            finished.extend(self.step())
            done += 1
        return self.report(finished, time.perf_counter() - start, done)

    def report(self, finished: list[Sequence] | None = None, busy_s: float = 0.0, steps: int = 0) -> InstanceReport:
        """The live samples are this instance's own objects; a remote backend ships copies."""
        st = self.stats
        per_token = st.prefill_s / st.prefill_tokens if st.prefill_tokens else None
        return InstanceReport(finished or [], list(self.live), self.free_slots, busy_s, steps, st.step_seconds,
                              st.tokens_per_step or 1.0, per_token, self.kv_bytes_per_token)

    def export(self, sample_ids: list[int], with_kv: bool = True) -> list[Migrant]:
        """Take live samples out of this instance, with their KV rows or without (to be recomputed)."""
        out = []
        for sample_id in sample_ids:
            seq = next((s for s in self.live if s.sample_id == sample_id), None)
            if seq is None:
                raise RlhfspecError(f"sample {sample_id} is not live on this instance.")
            if seq.trace is not None:
                seq.trace.compact()
            migrant = Migrant(seq, self.cache.rows(seq.slot) if with_kv else None)
            for name, d in self.drafters.items():
                state = d.export(seq, with_kv)
                if state is not None:
                    migrant.drafters[name] = state
            if self.strategy is not None:
                migrant.strategy = self.strategy.export(sample_id)
            self.release([seq])
            out.append(migrant)
        return out

    @torch.inference_mode()
    def adopt(self, migrants: list[Migrant]) -> None:
        """Continue samples exported elsewhere: load their KV rows, or recompute them in one packed forward."""
        if len(migrants) > self.free_slots:
            raise RlhfspecError(f"{len(migrants)} migrating samples do not fit: this instance has {self.free_slots} free slots.")
        t0 = time.perf_counter()
        recompute = []
        for m in migrants:
            s = m.seq
            self.validate(s)
            s.slot = len(self.live)
            self.live.append(s)
            self.cache.lengths[s.slot] = 0
            if m.kv is not None:
                self.cache.load_rows(s.slot, *m.kv)
            else:
                recompute.append(s)
            for name, d in self.drafters.items():
                d.adopt(s, m.drafters.get(name))
            if self.strategy is not None and m.strategy:
                self.strategy.adopt(s.sample_id, m.strategy)
        if recompute:
            # Everything but the last emitted token, which the next step feeds (the cache invariant).
            _, hidden = self._forward([s.slot for s in recompute], [(s.prompt + s.tokens)[:-1] for s in recompute], last_only=True)
            self._observe(recompute, hidden, [s.length - 1 for s in recompute], trace=False)  # their Traces hold these rows
            self.stats.prefill_tokens += sum(s.length - 1 for s in recompute)
            self.stats.prefill_s += time.perf_counter() - t0

    def release(self, seqs: list[Sequence]) -> None:
        """Free the samples' slots, moving the last live samples into the holes so slots stay dense;
        drafters and the strategy forget them."""
        for s in sorted(seqs, key=lambda s: s.slot, reverse=True):
            hole, last = s.slot, len(self.live) - 1
            for d in self.drafters.values():
                d.forget(s, hole)
            if self.strategy is not None:
                self.strategy.forget(s.sample_id)
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
