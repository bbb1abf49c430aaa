"""Model-free drafting by suffix matching (prompt-lookup decoding, generalised to RL groups).

A sample's last k tokens (k from max_ngram down to min_ngram) are looked up among the n-grams of
its own prompt and output, the outputs of the other samples of the same prompt (an RL group draws
one prompt many times), and earlier rollouts' responses to that prompt; the tokens that followed
the most recent match are the draft. q is one-hot, which keeps verification lossless.
"""

from __future__ import annotations

from collections import OrderedDict

from rlhfspec.engine.drafters.base import Drafter, Proposal
from rlhfspec.engine.sequence import Sequence


class _PromptIndex:
    """Documents sharing a prompt and, for every n-gram in them, where it last occurred."""

    def __init__(self, max_ngram: int, min_ngram: int):
        self.docs: list[list[int]] = []
        self.indexed: list[int] = []  # positions of docs[i] already entered in `last`
        self.done: list[int] = []  # docs of finished samples, oldest first
        self.last: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (doc, position after it)
        self.ngrams = range(min_ngram, max_ngram + 1)

    def add(self, doc: list[int]) -> int:
        self.docs.append(doc)
        self.indexed.append(0)
        return len(self.docs) - 1

    def catch_up(self, i: int, upto: int | None = None) -> None:
        """Enter the n-grams of docs[i] that end at positions not yet indexed, up to `upto` (default: its end)."""
        doc, start = self.docs[i], self.indexed[i]
        stop = len(doc) if upto is None else min(upto, len(doc))
        for end in range(start + 1, stop + 1):
            for k in self.ngrams:
                if end - k >= 0:
                    self.last[tuple(doc[end - k : end])] = (i, end)
        self.indexed[i] = max(start, stop)

    def continuation(self, own: int, n: int) -> list[int]:
        """Up to n tokens that followed the longest earlier occurrence of docs[own]'s suffix."""
        doc = self.docs[own]
        for k in reversed(self.ngrams):
            if len(doc) < k:
                continue
            hit = self.last.get(tuple(doc[-k:]))
            if hit is None:
                continue
            d, end = hit
            follow = self.docs[d][end : end + n]
            if follow:
                return follow
        return []


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, history_prompts: int = 4096, history_per_prompt: int = 32):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.history_prompts, self.history_per_prompt = history_prompts, history_per_prompt
        self.indexes: OrderedDict[tuple[int, ...], _PromptIndex] = OrderedDict()
        self.doc_of: dict[int, tuple[_PromptIndex, int]] = {}  # sample_id -> (index, doc number)

    def _index(self, prompt: list[int]) -> _PromptIndex:
        key = tuple(prompt)
        idx = self.indexes.get(key)
        if idx is None:
            idx = self.indexes[key] = _PromptIndex(self.max_ngram, self.min_ngram)
            while len(self.indexes) > self.history_prompts:
                self.indexes.popitem(last=False)
        else:
            self.indexes.move_to_end(key)
        return idx

    def admitted(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            idx = self._index(s.prompt)
            self.doc_of[s.sample_id] = (idx, idx.add(list(s.prompt)))

    def forget(self, seq: Sequence, slot: int) -> None:
        """Its response (so far) joins the prompt's history."""
        entry = self.doc_of.pop(seq.sample_id, None)
        if entry is not None:
            idx, i = entry
            idx.docs[i].extend(seq.tokens[len(idx.docs[i]) - len(seq.prompt) :])
            idx.catch_up(i)
            self._retire(idx, i)

    def _retire(self, idx: _PromptIndex, i: int) -> None:
        """Keep at most history_per_prompt finished responses per prompt; older ones stop matching."""
        idx.done.append(i)
        while len(idx.done) > self.history_per_prompt:
            idx.docs[idx.done.pop(0)] = []

    def replica(self) -> NgramDrafter:
        twin = type(self)(self.max_ngram, self.min_ngram, self.history_prompts, self.history_per_prompt)
        twin.name = self.name
        return twin

    def propose(self, seqs: list[Sequence], n: list[int]) -> Proposal:
        drafts = []
        for s, k in zip(seqs, n):
            entry = self.doc_of.get(s.sample_id)
            if entry is None:  # joined before this drafter was attached
                self.admitted([s])
                entry = self.doc_of[s.sample_id]
            idx, i = entry
            doc = idx.docs[i]
            doc.extend(s.tokens[len(doc) - len(s.prompt) :])
            # Index all but the n-grams ending at the last token, so the suffix does not match itself.
            idx.catch_up(i, len(doc) - 1)
            draft = idx.continuation(i, k) if k > 0 else []
            idx.catch_up(i)
            drafts.append(draft)
        return Proposal(drafts, None)

    def state_dict(self) -> dict:
        """What later drafts depend on (earlier responses per prompt), as plain lists for checkpoints."""
        return {"indexes": [[list(key), idx.docs, idx.done] for key, idx in self.indexes.items()]}

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the indexes (their n-gram tables are re-entered document by document)."""
        self.indexes, self.doc_of = OrderedDict(), {}
        for key, docs, done in state["indexes"]:
            idx = self.indexes[tuple(key)] = _PromptIndex(self.max_ngram, self.min_ngram)
            for doc in docs:
                idx.catch_up(idx.add(list(doc)))
            idx.done = list(done)
