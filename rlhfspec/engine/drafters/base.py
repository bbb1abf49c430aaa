"""The drafter protocol: propose n tokens per live sample, learn what was accepted, follow slot moves."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfspec.engine.sequence import Sequence


@dataclass(slots=True)
class Proposal:
    """Draft tokens per sample (possibly fewer than asked) and their processed probabilities
    q: [sum of draft lengths, V], or None when drafts are deterministic (one-hot q)."""

    tokens: list[list[int]]
    q: torch.Tensor | None


class Drafter:
    """Base drafter. Slots are the instance's: live sample b sits in slot b."""

    name = "drafter"

    def bind(self, instance) -> None:
        """Attach to a generation instance (called once, before any other method)."""

    def propose(self, seqs: list[Sequence], n: list[int]) -> Proposal:
        """Up to n[b] draft tokens for each live sample seqs[b] (n[b] may be 0)."""
        raise NotImplementedError

    def accepted(self, seqs: list[Sequence], drafts: list[list[int]], accepted: list[int]) -> None:
        """After verification and before the emitted tokens are appended: roll back what was rejected."""

    def admitted(self, seqs: list[Sequence]) -> None:
        """New samples took slots seqs[i].slot."""

    def moved(self, src: int, dst: int) -> None:
        """The sample in slot src now lives in slot dst (src becomes free)."""

    def finished(self, seq: Sequence, slot: int) -> None:
        """A sample left the instance from slot `slot`."""
