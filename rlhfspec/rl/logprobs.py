"""Token log-probabilities (and values) from the trainer's full-sequence forward, micro-batched so
that only response rows ever reach the 49k-wide output layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfspec.engine.sampling import SamplingParams, processed_logprobs
from rlhfspec.models.batch import hidden_states, padded_batch


@dataclass(slots=True)
class Batch:
    """Samples as prompt + completion; response-aligned tensors are [N, T] with T the longest completion."""

    prompts: list[list[int]]
    completions: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)

    def mask(self) -> torch.Tensor:
        t = max(1, max(len(c) for c in self.completions))
        return torch.tensor([[1.0] * len(c) + [0.0] * (t - len(c)) for c in self.completions])

    def micro_batches(self, max_tokens: int, ranks: int = 1) -> list[list[int]]:
        """Sample indices grouped by length (each group shortest first) so each group's padded length
        x size stays under max_tokens; with ranks > 1, its padded length x its size / ranks (rounded
        up): the budget of one rank's every-ranks-th row of the group."""
        order = sorted(range(len(self)), key=lambda i: len(self.prompts[i]) + len(self.completions[i]))
        groups, current, width = [], [], 0
        for i in order:
            w = max(width, len(self.prompts[i]) + len(self.completions[i]))
            if current and w * -(-(len(current) + 1) // ranks) > max_tokens:
                groups.append(current)
                current, w = [], len(self.prompts[i]) + len(self.completions[i])
            current.append(i)
            width = w
        if current:
            groups.append(current)
        return groups


def response_hidden(model, batch: Batch, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the rows that predict each completion token: [b, T, H] and mask [b, T]."""
    seqs = [batch.prompts[i] + batch.completions[i] for i in idx]
    hidden = hidden_states(model, *padded_batch(seqs))
    t = max(1, max(len(batch.completions[i]) for i in idx))
    rows = torch.zeros(len(idx), t, dtype=torch.long)
    mask = torch.zeros(len(idx), t)
    for r, i in enumerate(idx):
        p, c = len(batch.prompts[i]), len(batch.completions[i])
        rows[r, :c] = torch.arange(p - 1, p + c - 1)
        mask[r, :c] = 1
    picked = hidden.gather(1, rows[:, :, None].expand(-1, -1, hidden.shape[-1]).to(hidden.device))
    return picked, mask


def completion_logprobs(model, batch: Batch, idx: list[int], params: SamplingParams, entropy: bool = False,
                        entropy_grad: bool = False):
    """log p(token) of each completion token under the processed distribution: [b, T] (0 where
    masked) and the mask; with entropy=True also each row's entropy H(p) = -sum p log p [b, T],
    differentiable only with entropy_grad (an entropy bonus); otherwise a statistic, computed
    without recording it for the backward pass."""
    hidden, mask = response_hidden(model, batch, idx)
    b, t, _ = hidden.shape
    flat = hidden.reshape(b * t, -1)
    keep = mask.reshape(-1).bool()
    targets = torch.zeros(b, t, dtype=torch.long)
    for r, i in enumerate(idx):
        targets[r, : len(batch.completions[i])] = torch.tensor(batch.completions[i])
    out = torch.zeros(b * t, dtype=torch.float32, device=hidden.device)
    lp = processed_logprobs(model.logits(flat[keep]), params)
    out = out.masked_scatter(keep.to(out.device), lp.gather(-1, targets.reshape(-1)[keep][:, None].to(lp.device)).squeeze(-1))
    if not entropy:
        return out.view(b, t), mask
    if entropy_grad:
        h = -(lp.exp() * lp.masked_fill(torch.isinf(lp), 0.0)).sum(-1)
    else:
        with torch.no_grad():  # two passes over the [rows, vocabulary] logprobs instead of five
            finite = lp.detach().clamp(min=torch.finfo(lp.dtype).min)  # p log p = 0 where p = 0
            h = -finite.mul_(lp.detach().exp()).sum(-1)
    ent = torch.zeros(b * t, dtype=torch.float32, device=hidden.device).masked_scatter(keep.to(hidden.device), h)
    return out.view(b, t), mask, ent.view(b, t)


@torch.no_grad()
def all_logprobs(model, batch: Batch, params: SamplingParams, max_tokens: int) -> torch.Tensor:
    """completion_logprobs for every sample, response-aligned [N, T]."""
    t = batch.mask().shape[1]
    out = torch.zeros(len(batch), t)
    for idx in batch.micro_batches(max_tokens):
        lp, _ = completion_logprobs(model, batch, idx, params)
        out[idx, : lp.shape[1]] = lp.float().cpu()
    return out


def values_at(critic, head: torch.Tensor, batch: Batch, idx: list[int]) -> torch.Tensor:
    """The critic's value estimate at each completion row: [b, T]."""
    hidden, mask = response_hidden(critic, batch, idx)
    h = critic.normed(hidden)
    return (h @ head.to(h.dtype)).squeeze(-1).float() * mask.to(h.device)
