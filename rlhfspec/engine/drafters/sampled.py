"""What drafters that sample from a distribution q share: processing q as the policy's p is
processed, drawing drafts with plain sampling's own uniforms, and spreading a reduced draft
vocabulary's logits over the policy's."""

from __future__ import annotations

import torch

from rlhfspec.engine.sampling import SAMPLE, group_rows, processed_logprobs, sample
from rlhfspec.engine.sequence import Sequence, uniforms


def draft_logprobs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Processed draft logprobs (each sample's temperature, top-k, top-p): logits [R, V] -> [R, V] for seqs[r]."""
    out = torch.empty_like(logits)
    for params, rows in group_rows([s.params for s in seqs]).items():
        idx = torch.tensor(rows, device=logits.device)
        out[idx] = processed_logprobs(logits[idx], params)
    return out


def draw_drafts(seqs: list[Sequence], logq: torch.Tensor, j: int) -> list[int]:
    """Draft j (0-based) of each sample: logq [R, V] for seqs[r]; argmax for greedy samples."""
    # d_j is drawn with the very uniform plain sampling would use at its position: when q equals
    # p the drafts are the plain samples and every one is accepted. The uniform stays unused by
    # anything kept from this step beyond that position, so reusing it later keeps sampling exact.
    dev = logq.device
    greedy = torch.tensor([s.params.greedy for s in seqs], device=dev)
    u = uniforms(seqs, [s.length + j for s in seqs], SAMPLE, dev)
    drawn = sample(logq, u, greedy=False)
    return torch.where(greedy, logq.argmax(-1), drawn).tolist()


def spread(reduced: torch.Tensor, vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits over a draft vocabulary [R, len(vocab)] -> over the policy's [R, vocab_size], -inf
    (q = 0, which verification handles losslessly) outside it."""
    full = torch.full((reduced.shape[0], vocab_size), float("-inf"), device=reduced.device)
    full[:, vocab] = reduced.float()
    return full
