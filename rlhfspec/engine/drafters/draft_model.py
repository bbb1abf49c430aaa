"""A small draft LM sharing the policy's vocabulary, with its own KV cache kept in step with the policy's."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhfspec.engine.drafters.base import Drafter, Proposal
from rlhfspec.engine.drafters.sampled import draft_logprobs, draw_drafts, spread
from rlhfspec.engine.sequence import Sequence
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.invariance import rowwise
from rlhfspec.models.kv_cache import KVCache
from rlhfspec.models.linear import projection

DRAFT_VOCAB_FILE = "draft_vocab.json"


class DraftModelDrafter(Drafter):
    """Drafts with a smaller model. Its cache holds, for every live sample, a prefix of the sample's
    tokens (`cache.lengths[slot]` of them); `propose` first feeds whatever the cache lacks, so a
    sample is caught up however many steps this drafter sat out, and a full acceptance (whose
    last draft never went through the draft model) costs no special case.

    `draft_vocab`: token ids the draft head scores (q = 0 elsewhere, which stays lossless); a
    draft checkpoint may carry them in draft_vocab.json.
    """

    name = "draft"

    def __init__(self, model, policy=None, *, tokenizer=None, policy_tokenizer=None, draft_vocab: list[int] | None = None, name: str = "draft"):
        self.model = model
        self.name = name
        if policy is not None:
            check_same_vocabulary(policy, model, policy_tokenizer, tokenizer)
        self.vocab = None if draft_vocab is None else torch.tensor(sorted(draft_vocab), device=model.device)
        self.cache: KVCache | None = None
        self._head: tuple[tuple, torch.Tensor] | None = None  # (weight version, rows of the draft vocabulary)

    @classmethod
    def load(cls, path: str | Path, policy, policy_tokenizer=None, **kw) -> DraftModelDrafter:
        from rlhfspec.models.loader import load_model

        model, tok = load_model(path, dtype=policy.dtype, device=policy.device)
        vocab_file = Path(path) / DRAFT_VOCAB_FILE
        vocab = json.loads(vocab_file.read_text()) if vocab_file.is_file() else None
        return cls(model, policy, tokenizer=tok, policy_tokenizer=policy_tokenizer, draft_vocab=vocab, **kw)

    def state_dict(self) -> dict:
        """The draft weights (RL refreshes them as the policy drifts), for checkpoints."""
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.model.load_state_dict(state["model"])

    def replica(self) -> DraftModelDrafter:
        vocab = None if self.vocab is None else self.vocab.tolist()
        return DraftModelDrafter(self.model, draft_vocab=vocab, name=self.name)

    @property
    def kv_bytes_per_token(self) -> float:
        return float(self.cache.bytes_per_token)

    def bind(self, instance) -> None:
        self.model.ensure_positions(instance.max_len)
        self.cache = KVCache(self.model.config, instance.max_batch, instance.max_len, self.model.dtype, self.model.device,
                             invariant=instance.cache.invariant)

    def admitted(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            self.cache.lengths[s.slot] = 0

    def moved(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)

    def forget(self, seq: Sequence, slot: int) -> None:
        self.cache.lengths[slot] = 0

    def export(self, seq: Sequence, with_kv: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Its cached rows (a prefix of the sample's tokens), unless the destination is to recompute."""
        return self.cache.rows(seq.slot) if with_kv and self.cache.lengths[seq.slot] else None

    def adopt(self, seq: Sequence, state) -> None:
        self.cache.lengths[seq.slot] = 0
        if state is not None:
            self.cache.load_rows(seq.slot, *state)

    def propose(self, seqs: list[Sequence], n: list[int]) -> Proposal:
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [b for b, k in enumerate(n) if k > 0]
        if active:
            with torch.inference_mode():
                # First round feeds everything the draft cache lacks (at least the last token).
                feeds = [(s.prompt + s.tokens)[self.cache.lengths[s.slot] :] for s in (seqs[b] for b in active)]
                for j in range(max(n)):
                    logq = self._next(seqs, active, feeds)
                    tokens = draw_drafts([seqs[b] for b in active], logq, j)
                    q = rowwise(torch.exp, logq)
                    for i, b in enumerate(active):
                        drafts[b].append(tokens[i])
                        probs[b].append(q[i])
                    active = [b for b in active if n[b] > j + 1]
                    feeds = [[drafts[b][-1]] for b in active]
                    if not active:
                        break
        flat = [p for ps in probs for p in ps]
        return Proposal(drafts, torch.stack(flat) if flat else None)

    def accepted(self, seqs: list[Sequence], drafts: list[list[int]], accepted: list[int]) -> None:
        """Keep the cached prefix that matches the tokens about to be emitted."""
        for s, d, k in zip(seqs, drafts, accepted):
            if d:
                # Cached: the sample's tokens, then d_1..d_{n-1}; the first k drafts stand.
                self.cache.lengths[s.slot] = s.length + min(k, len(d) - 1)

    def _next(self, seqs: list[Sequence], active: list[int], feeds: list[list[int]]) -> torch.Tensor:
        """Processed draft logprobs [len(active), V] after feeding feeds[i] to active sample i."""
        hidden = self.cache.forward(self.model, [seqs[b].slot for b in active], feeds, last_only=True)
        return draft_logprobs(self._logits(hidden), [seqs[b] for b in active])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.vocab is None:
            return self.model.logits(hidden, self.cache.invariant)
        return spread(self._reduced_head()(self.model.normed(hidden)), self.vocab, self.model.config.vocab_size)

    def _reduced_head(self):
        """The output layer's rows for the draft vocabulary as a projection, gathered (and packed)
        once per weight update (gathering them at every draft token cost more than the draft's own layers)."""
        head = self.model.head_weight
        key = (head.data_ptr(), head._version)
        if self._head is None or self._head[0] != key:
            self._head = (key, projection(head.detach()[self.vocab], None, inference=True, invariant=self.cache.invariant))
        return self._head[1]


def check_same_vocabulary(policy, draft, policy_tokenizer=None, draft_tokenizer=None) -> None:
    """A drafter must speak the policy's vocabulary: same size, and the same tokens when both tokenizers are known."""
    pv, dv = policy.config.vocab_size, draft.config.vocab_size
    if pv != dv:
        raise RlhfspecError(f"the drafter's vocabulary has {dv} tokens but the policy's has {pv}; a drafter must share the policy's tokenizer.")
    if policy_tokenizer is not None and draft_tokenizer is not None:
        a = policy_tokenizer.convert_ids_to_tokens(list(range(len(policy_tokenizer))))
        b = draft_tokenizer.convert_ids_to_tokens(list(range(len(draft_tokenizer))))
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                raise RlhfspecError(f"the drafter's token {i} is {y!r} but the policy's is {x!r}; a drafter must share the policy's tokenizer.")
        if len(a) != len(b):
            raise RlhfspecError(f"the drafter's tokenizer has {len(b)} tokens but the policy's has {len(a)}.")
