"""A drafter that reads the policy's own features: an EAGLE-style head (rlhfspec.models.eagle)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rlhfspec.engine.drafters.base import Drafter, Proposal
from rlhfspec.engine.drafters.sampled import draft_logprobs, draw_drafts, spread
from rlhfspec.engine.sampling import sample
from rlhfspec.engine.sequence import Sequence, uniforms
from rlhfspec.engine.tree import branch_purposes
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.attention import TreeRows
from rlhfspec.models.eagle import EagleHead
from rlhfspec.models.invariance import rowwise
from rlhfspec.models.kv_cache import KVCache


class EagleDrafter(Drafter):
    """Drafts a chain of n tokens per sample with the head: the first from the policy's feature of
    the last committed position and the last emitted token, the next ones from the head's own
    predicted features. Drafts are sampled from the head's processed distribution q (returned,
    zero outside the draft vocabulary), so verification is the exact accept/resample rule.

    With branches = k > 1 it drafts a tree: k first drafts drawn from q without replacement (q's
    top k for greedy samples), each continued as its own chain; the head reads a branch's rows
    through a tree mask, so one head forward per position serves every branch. Candidate i is
    handed over with the distribution it was drawn from (q without the earlier candidates,
    renormalised), which is what makes tree verification's rounds exact (engine/tree.py).

    Per slot the head keeps a KV cache of its inputs (f_t, x_{t+1}) for t < `cache.lengths[slot]`,
    built from the policy's real features only (chain rows are rolled back after verification, as
    in EAGLE), and the features the instance handed over that it has not fed yet (`pending`).
    Invariant at `propose`: cached + pending = the policy's cached positions (sample length - 1).
    """

    name = "eagle"
    reads_features = True

    def __init__(self, head: EagleHead, policy=None, *, name: str = "eagle", branches: int = 1):
        if not isinstance(branches, int) or branches < 1:
            raise RlhfspecError(f"an eagle drafter's branches is {branches!r}; it must be an integer >= 1.")
        self.head = head
        self.name = name
        self.branches = branches
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
        return EagleDrafter(self.head, name=self.name, branches=self.branches)

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
        # The instance's cache length: room for the rows of a tree's branches too.
        self.cache = KVCache(self.head.config, instance.max_batch, instance.cache.max_len, self.head.dtype, self.head.device,
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
        k = self.branches
        chains = [[[] for _ in range(k)] for _ in seqs]  # chains[b][i]: branch i's drafts
        probs = [[[] for _ in range(k)] for _ in seqs]
        active = [b for b, m in enumerate(n) if m > 0]
        if active:
            with torch.inference_mode():
                features, tokens = self._catch_up([seqs[b] for b in active])
                predicted = self._feed([seqs[b] for b in active], features, tokens)
                base = [self.cache.lengths[seqs[b].slot] for b in active]  # head rows every branch sees
                width = 1  # rows per sample in `predicted`: one before the first draft, then one per branch
                for j in range(max(n)):
                    group = [seqs[b] for b in active for _ in range(width)]
                    logq = draft_logprobs(spread(self.head.logits(predicted, self.cache.invariant), self.head.vocab,
                                                 self.policy.config.vocab_size), group)
                    taken = torch.zeros(logq.shape, dtype=torch.bool, device=logq.device) if width == 1 and k > 1 else None
                    for i in range(k):
                        rows = logq if width == 1 else logq[i::k]
                        if taken is not None and i:  # the first drafts: without replacement
                            rows = _without(rows, taken)
                        drawn = self._draw([seqs[b] for b in active], rows, j, i)
                        q = rowwise(torch.exp, rows)
                        for a, b in enumerate(active):
                            chains[b][i].append(drawn[a])
                            probs[b][i].append(q[a])
                        if taken is not None:
                            taken[torch.arange(len(active), device=logq.device), torch.tensor(drawn, device=logq.device)] = True
                    keep = [a for a, b in enumerate(active) if n[b] > j + 1]
                    if not keep:
                        break
                    # The next position reads each branch's own predicted feature and its token just drafted.
                    idx = torch.tensor([a * width + (i if width > 1 else 0) for a in keep for i in range(k)], device=predicted.device)
                    features = predicted[idx]
                    active, base = [active[a] for a in keep], [base[a] for a in keep]
                    tokens = [[chains[b][i][-1]] for b in active for i in range(k)]
                    predicted = self._feed([seqs[b] for b in active], features, tokens, self._branch_rows(base, j))
                    width = k
        drafts = [[t for chain in cs for t in chain] for cs in chains]
        flat = [p for ps in probs for chain in ps for p in chain]
        return Proposal(drafts, torch.stack(flat) if flat else None, branches=k)

    def _draw(self, seqs: list[Sequence], logq: torch.Tensor, j: int, branch: int) -> list[int]:
        """Draft j (0-based) of branch `branch` for each sample from logq [R, V] (seqs[r]'s row):
        branch 0 as a chain draws it; the others with their own uniforms (argmax for greedy samples)."""
        if branch == 0:
            return draw_drafts(seqs, logq, j)
        dev = logq.device
        greedy = torch.tensor([s.params.greedy for s in seqs], device=dev)
        drawn = sample(logq, uniforms(seqs, [s.length + j for s in seqs], branch_purposes(branch)[0], dev), greedy=False)
        return torch.where(greedy, logq.argmax(-1), drawn).tolist()

    def _branch_rows(self, base: list[int], j: int) -> TreeRows | None:
        """The head rows of the feed after draft j: sample b's branch i at cache row base + j*k + i,
        position base + j, seeing its own branch's earlier rows (None for one branch: a chain)."""
        k = self.branches
        if k == 1:
            return None
        positions = [[m + j] * k for m in base]
        seen = [[[m + jj * k + i for jj in range(j + 1)] for i in range(k)] for m in base]
        return TreeRows(positions, list(base), seen)

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

    def _feed(self, seqs: list[Sequence], features: torch.Tensor, tokens: list[list[int]], tree: TreeRows | None = None) -> torch.Tensor:
        """Run the head over inputs (features [sum q, H], tokens) appended to each sample's head
        cache: tokens[b] for seqs[b], or with a tree, k rows per sample (tokens sample-major); the
        predicted feature after each sample's last input [B, H], or of every row with a tree."""
        if tree is not None:
            k = len(tokens) // len(seqs)
            tokens = [[t for ts in tokens[a * k : (a + 1) * k] for t in ts] for a in range(len(seqs))]
        slots, q_lens = [s.slot for s in seqs], [len(t) for t in tokens]
        attention = self.cache.attend(slots, q_lens, tree)
        ids = torch.tensor([t for ts in tokens for t in ts], device=features.device)
        embeds = F.embedding(ids, self.policy.embed.weight)
        out = self.head(features.to(self.head.dtype), embeds.to(self.head.dtype), attention.positions, attention)
        self.cache.advance(slots, q_lens)
        if tree is None and max(q_lens) > 1:
            out = out[torch.tensor(q_lens, device=out.device).cumsum(0) - 1]
        return out

    def accepted(self, seqs: list[Sequence], drafts: list[list[int]], accepted: list[int]) -> None:
        """Drop the chain's rows: the head's cache keeps only inputs built from the policy's own
        features, and the verified positions' features arrive next through `observe`."""
        for s, d in zip(seqs, drafts):
            if d:
                self.cache.lengths[s.slot] = s.length - 1


def _without(logq: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """log q renormalised without the tokens already taken: logq [R, V], taken [R, V] bool. A row
    with no mass left keeps all of q (its next draft is then a draw with replacement, which
    verification takes just as exactly)."""
    masked = logq.masked_fill(taken, float("-inf"))
    empty = torch.isinf(masked).all(-1, keepdim=True)
    return torch.where(empty, logq, torch.log_softmax(masked, dim=-1))
