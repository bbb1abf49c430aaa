"""A drafter that reads the policy's own features: an EAGLE-style head (rlhfspec.models.eagle)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rlhfspec.engine.drafters.base import Drafter, Proposal
from rlhfspec.engine.drafters.sampled import draft_logprobs, draw_drafts, spread
from rlhfspec.engine.sequence import Sequence
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.eagle import EagleHead
from rlhfspec.models.invariance import rowwise
from rlhfspec.models.kv_cache import KVCache


class EagleDrafter(Drafter):
    """Drafts a chain of n tokens per sample with the head: the first from the policy's feature of
    the last committed position and the last emitted token, the next ones from the head's own
    predicted features. Drafts are sampled from the head's processed distribution q (returned,
    zero outside the draft vocabulary), so verification is the exact accept/resample rule.

    Per slot the head keeps a KV cache of its inputs (f_t, x_{t+1}) for t < `cache.lengths[slot]`,
    built from the policy's real features only (chain rows are rolled back after verification, as
    in EAGLE), and the features the instance handed over that it has not fed yet (`pending`).
    Invariant at `propose`: cached + pending = the policy's cached positions (sample length - 1).
    """

    name = "eagle"
    reads_features = True

    def __init__(self, head: EagleHead, policy=None, *, name: str = "eagle"):
        self.head = head
        self.name = name
        if policy is not None:
            head.check_fits(policy)
        self.policy = None
        self.cache: KVCache | None = None
        self.pending: list[list[torch.Tensor]] = []

    @classmethod
    def load(cls, path: str | Path, policy, **kw) -> EagleDrafter:
        head = EagleHead.load(path, dtype=policy.dtype, device=policy.device)
        return cls(head, policy, **kw)

    def replica(self) -> EagleDrafter:
        return EagleDrafter(self.head, name=self.name)

    def state_dict(self) -> dict:
        """The head's weights (RL refreshes them as the policy drifts), for checkpoints."""
        return {"head": {k: v.detach().clone() for k, v in self.head.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.head.load_state_dict(state["head"])

    @property
    def kv_bytes_per_token(self) -> float:
        return float(self.cache.bytes_per_token)

    def bind(self, instance) -> None:
        self.head.check_fits(instance.model)
        self.policy = instance.model
        self.head.ensure_positions(instance.max_len)
        self.cache = KVCache(self.head.config, instance.max_batch, instance.max_len, self.head.dtype, self.head.device,
                             invariant=instance.cache.invariant)
        self.pending = [[] for _ in range(instance.max_batch)]

    # --- following the instance's slots -------------------------------------------------------
    def observe(self, seqs: list[Sequence], features: list[torch.Tensor]) -> None:
        for s, f in zip(seqs, features):
            if f.shape[0]:
                self.pending[s.slot].append(f)

    def admitted(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            self.cache.lengths[s.slot] = 0
            self.pending[s.slot] = []

    def moved(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)
        self.pending[dst], self.pending[src] = self.pending[src], []

    def forget(self, seq: Sequence, slot: int) -> None:
        self.cache.lengths[slot] = 0
        self.pending[slot] = []

    def export(self, seq: Sequence, with_kv: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Its cached rows and the features not fed yet, unless the destination recomputes (which
        hands it every feature again)."""
        if not with_kv:
            return None
        k, v = self.cache.rows(seq.slot)
        return k, v, self._pending(seq.slot)

    def adopt(self, seq: Sequence, state) -> None:
        self.admitted([seq])
        if state is not None:
            k, v, features = state
            self.cache.load_rows(seq.slot, k, v)
            if features.shape[0]:
                self.pending[seq.slot] = [features.to(self.head.device, self.head.dtype)]

    def _pending(self, slot: int) -> torch.Tensor:
        chunks = self.pending[slot]
        if not chunks:
            return torch.empty(0, self.head.hidden_size, dtype=self.head.dtype, device=self.head.device)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    # --- drafting -------------------------------------------------------------------------------
    def propose(self, seqs: list[Sequence], n: list[int]) -> Proposal:
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [b for b, k in enumerate(n) if k > 0]
        if active:
            with torch.inference_mode():
                features, tokens = self._catch_up([seqs[b] for b in active])
                for j in range(max(n)):
                    predicted = self._feed([seqs[b] for b in active], features, tokens)
                    group = [seqs[b] for b in active]
                    logq = draft_logprobs(spread(self.head.logits(predicted, self.cache.invariant), self.head.vocab,
                                                 self.policy.config.vocab_size), group)
                    drawn = draw_drafts(group, logq, j)
                    q = rowwise(torch.exp, logq)
                    for i, b in enumerate(active):
                        drafts[b].append(drawn[i])
                        probs[b].append(q[i])
                    keep = [i for i, b in enumerate(active) if n[b] > j + 1]
                    if not keep:
                        break
                    # The next link reads the head's own prediction and the token just drafted.
                    idx = torch.tensor(keep, device=predicted.device)
                    features = predicted[idx]
                    active = [active[i] for i in keep]
                    tokens = [[drafts[b][-1]] for b in active]
        flat = [p for ps in probs for p in ps]
        return Proposal(drafts, torch.stack(flat) if flat else None)

    def _catch_up(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[list[int]]]:
        """The inputs each sample's head cache lacks: the policy's features (normed) of positions
        cached..L-1 ([sum, H]) and the tokens that followed them (L: the policy's cached positions)."""
        features, tokens = [], []
        for s in seqs:
            m, last = self.cache.lengths[s.slot], s.length - 1
            f = self._pending(s.slot)
            if f.shape[0] != last - m or last == m:
                raise RlhfspecError(f"the eagle drafter holds features of {m + f.shape[0]} positions of sample {s.sample_id} but the "
                                    f"policy has cached {last}; it must be attached to the instance before the sample is added.")
            self.pending[s.slot] = []
            features.append(f)
            tokens.append((s.prompt + s.tokens)[m + 1 : last + 1])
        return self.policy.normed(torch.cat(features)), tokens

    def _feed(self, seqs: list[Sequence], features: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
        """Run the head over inputs (features [sum q, H], tokens[b]) appended to each sample's head
        cache; the predicted feature after each sample's last input [B, H]."""
        slots, q_lens = [s.slot for s in seqs], [len(t) for t in tokens]
        attention = self.cache.attend(slots, q_lens)
        ids = torch.tensor([t for ts in tokens for t in ts], device=features.device)
        embeds = F.embedding(ids, self.policy.embed.weight)
        out = self.head(features.to(self.head.dtype), embeds.to(self.head.dtype), attention.positions, attention)
        self.cache.advance(slots, q_lens)
        if max(q_lens) > 1:
            out = out[torch.tensor(q_lens, device=out.device).cumsum(0) - 1]
        return out

    def accepted(self, seqs: list[Sequence], drafts: list[list[int]], accepted: list[int]) -> None:
        """Drop the chain's rows: the head's cache keeps only inputs built from the policy's own
        features, and the verified positions' features arrive next through `observe`."""
        for s, d in zip(seqs, drafts):
            if d:
                self.cache.lengths[s.slot] = s.length - 1
