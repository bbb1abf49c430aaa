"""The drafter protocol: propose n tokens per live sample, learn what was accepted, follow the
instance's slots, and hand a sample's own state over when it migrates."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfspec.engine.sequence import Sequence
from rlhfspec.errors import RlhfspecError


@dataclass(slots=True)
class Proposal:
    """Draft tokens per sample (possibly fewer than asked) and their processed probabilities
    q: [sum of draft lengths, V], or None when drafts are deterministic (one-hot q). With
    branches > 1, tokens[b] holds that many chains of equal length, one after the other, that
    share their first position (a tree; engine/tree.py), and q's rows follow the same order."""

    tokens: list[list[int]]
    q: torch.Tensor | None
    branches: int = 1


class Drafter:
    """Base drafter. Slots are the instance's: live sample b sits in slot b. The instance calls
    the methods from `bind` to `adopt`; `replica`, `state_dict` and `load_state_dict` serve whoever
    keeps drafters across instances and iterations (the RL rollout). A drafter overrides what it needs."""

    name = "drafter"
    # Chains per sample its proposals hold (a tree sharing the first position when > 1).
    branches = 1
    # Whether the instance hands it the policy's hidden states (`observe`); they cost nothing
    # extra: every forward computes them for the rows it writes.
    reads_features = False

    def bind(self, instance) -> None:
        """Attach to a generation instance (called once, before any other method)."""

    def propose(self, seqs: list[Sequence], n: list[int]) -> Proposal:
        """Up to n[b] draft tokens for each live sample seqs[b] (n[b] may be 0)."""
        raise NotImplementedError

    def accepted(self, seqs: list[Sequence], drafts: list[list[int]], accepted: list[int]) -> None:
        """After verification and before the emitted tokens are appended: roll back what was rejected."""

    def observe(self, seqs: list[Sequence], features: list[torch.Tensor]) -> None:
        """Only for drafters that set `reads_features`: after every forward of the policy (prefill,
        decode, verification, recomputation), the final hidden states before the last norm of the
        positions it just committed to seqs[b]'s cache, in order: features[b] [k_b, H] (k_b may be 0).
        Called after `accepted`, before the emitted tokens are appended."""

    def admitted(self, seqs: list[Sequence]) -> None:
        """New samples took slots seqs[i].slot."""

    def moved(self, src: int, dst: int) -> None:
        """The sample in slot src now lives in slot dst (src becomes free)."""

    def forget(self, seq: Sequence, slot: int) -> None:
        """The sample left slot `slot` (finished, or exported to another instance): drop its own
        state (what it taught the drafter about its prompt may stay)."""

    def export(self, seq: Sequence, with_kv: bool):
        """The sample's own state to travel with it to another instance (None: nothing worth
        shipping; the destination rebuilds it). Called before `forget`."""
        return None

    def adopt(self, seq: Sequence, state) -> None:
        """A migrated sample took slot seq.slot, with what `export` gave (or None)."""
        self.admitted([seq])

    def replica(self) -> Drafter:
        """A drafter of the same kind for another instance in this process (weights shared, no per-sample state)."""
        raise RlhfspecError(f"drafter {self.name!r} cannot be replicated across generation instances.")

    @property
    def kv_bytes_per_token(self) -> float:
        """Bytes of its own KV cache one token of a sample occupies (what a migration ships)."""
        return 0.0

    def state_dict(self) -> dict:
        """What later drafts depend on beyond the weights' initial state, for checkpoints (plain data or tensors)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict gave."""
