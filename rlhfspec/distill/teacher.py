"""Teacher targets: the policy's next-token distributions over its own generated text, kept as top-k."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlhfspec.models.batch import hidden_states, padded_batch

TOP_K = 32  # the targets a drafter refresh in the RL loop trains on: the top-32 next-token logprobs


@dataclass(slots=True)
class Example:
    """A prompt+response sequence and the teacher's top-k next-token logprobs at each response
    position (row j predicts response token j): ids, logprobs [len(response), k]."""

    tokens: list[int]
    start: int  # index of the first response token
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    features: torch.Tensor | None = None  # the policy's features (hidden states after the last norm) [len(tokens), H]


@torch.no_grad()
def teacher_examples(policy, sequences: list[list[int]], starts: list[int], k: int = 32, micro_batch: int = 8,
                     features: bool = False, deadline: float | None = None,
                     seconds_per_token: float | None = None) -> list[Example]:
    """Top-k of the policy's distribution (temperature 1) at every response position, and with
    `features` the policy's features at every position (what an eagle head reads), from the same
    forward. With `deadline` (a time.perf_counter() value) it takes only the sequences whose forward
    it expects to end by then: each micro-batch is cut to the sequences that fit at the rate measured
    so far (seconds per token), or at `seconds_per_token` before it has measured one; with
    neither, the first micro-batch runs whole. It stops at the first sequence that does not fit."""
    out = []
    spent, done = 0.0, 0
    for i in range(0, len(sequences), micro_batch):
        seqs, sts = sequences[i : i + micro_batch], starts[i : i + micro_batch]
        rate = spent / done if done else seconds_per_token
        if deadline is not None and rate is not None:
            room = deadline - time.perf_counter()
            fit, tokens = 0, 0
            while fit < len(seqs) and (tokens + len(seqs[fit])) * rate <= room:
                tokens += len(seqs[fit])
                fit += 1
            if fit == 0:
                break
            seqs, sts = seqs[:fit], sts[:fit]
        began = time.perf_counter()
        hidden = hidden_states(policy, *padded_batch(seqs))
        for row, (s, st) in enumerate(zip(seqs, sts)):
            logp = torch.log_softmax(policy.logits(hidden[row, st - 1 : len(s) - 1]), dim=-1)
            top = logp.topk(k, dim=-1)
            feats = policy.normed(hidden[row, : len(s)]).float().cpu() if features else None
            out.append(Example(s, st, top.indices.cpu(), top.values.cpu(), feats))
        spent += time.perf_counter() - began
        done += sum(len(s) for s in seqs)
        if len(seqs) < len(sequences[i : i + micro_batch]):
            break
    return out
