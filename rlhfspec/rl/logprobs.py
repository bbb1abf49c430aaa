"""Token log-probabilities (and values) from the trainer's full-sequence forward, micro-batched so
that only response rows ever reach the 49k-wide output layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from rlhfspec.engine.sampling import SamplingParams, processed_logprobs
from rlhfspec.models.attention import SharedPromptAttention
from rlhfspec.models.batch import hidden_states, padded_batch


@dataclass(slots=True)
class Batch:
    """Samples as prompt + completion; response-aligned tensors are [N, T] with T the longest completion.

    With `share_prompts` (train.share_prompts) the trainer's forwards compute each prompt once for
    its samples: a forward runs each distinct prompt once and every completion after it, packed
    without padding, each completion seeing its prompt and itself (positions continue from the
    prompt's end), so a group of G samples costs one prompt plus G completions instead of G of each.
    """

    prompts: list[list[int]]
    completions: list[list[int]]
    share_prompts: bool = False

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: list[int]) -> Batch:
        return Batch([self.prompts[i] for i in idx], [self.completions[i] for i in idx], self.share_prompts)

    def mask(self) -> torch.Tensor:
        t = max(1, max(len(c) for c in self.completions))
        return torch.tensor([[1.0] * len(c) + [0.0] * (t - len(c)) for c in self.completions])

    def units(self, max_tokens: int) -> list[list[int]]:
        """What micro-batches are made of: a sample; with share_prompts, samples of one prompt
        (shortest completions first), as many as fit in max_tokens with their prompt once."""
        if not self.share_prompts:
            return [[i] for i in range(len(self))]
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(self.prompts):
            by_prompt.setdefault(tuple(p), []).append(i)
        out = []
        for rows in by_prompt.values():
            unit, width = [], len(self.prompts[rows[0]])
            for i in sorted(rows, key=lambda i: len(self.completions[i])):
                if unit and width + len(self.completions[i]) > max_tokens:
                    out.append(unit)
                    unit, width = [], len(self.prompts[i])
                unit.append(i)
                width += len(self.completions[i])
            out.append(unit)
        return out

    def width(self, unit: list[int]) -> int:
        """A unit's tokens: its prompt (once) and its completions."""
        return len(self.prompts[unit[0]]) + sum(len(self.completions[i]) for i in unit)

    def forward_tokens(self, idx: list[int]) -> int:
        """Tokens one forward over samples `idx` runs through the model, padding included (with
        share_prompts a completion's last token is not run: no logprob reads it, no token sees it)."""
        if self.share_prompts:
            return sum(map(len, {tuple(self.prompts[i]) for i in idx})) + sum(max(len(self.completions[i]) - 1, 0) for i in idx)
        return len(idx) * max(len(self.prompts[i]) + len(self.completions[i]) for i in idx)

    def unit_groups(self, max_tokens: int) -> list[list[list[int]]]:
        """Units grouped by width (each group narrowest first) so each group's widest x its size
        stays under max_tokens."""
        return self._by_width(self.units(max_tokens), max_tokens)

    def micro_batches(self, max_tokens: int) -> list[list[int]]:
        """Sample indices of each of unit_groups' groups (a unit's samples in a row)."""
        return [[i for unit in group for i in unit] for group in self.unit_groups(max_tokens)]

    def rank_shares(self, max_tokens: int, ranks: int) -> list[list[list[int]]]:
        """Each of `ranks` data-parallel ranks' micro-batches (sample indices) of this batch, their
        forward tokens evened: the units (`units`) dealt largest first to the rank with the fewest
        forward tokens so far; then, with share_prompts, while moving some completions of a unit
        of the busiest rank to the idlest lowers the busiest's load without raising the idlest's
        above it (the moved completions' prompt is then computed on both ranks), they move. Each
        rank's units are grouped by width as unit_groups does; every rank computes the same shares."""
        if ranks == 1:
            return [self.micro_batches(max_tokens)]
        loads, owned = [0] * ranks, [[] for _ in range(ranks)]
        for unit in sorted(self.units(max_tokens), key=lambda u: (-self.forward_tokens(u), u[0])):
            rank = min(range(ranks), key=lambda r: (loads[r], r))
            owned[rank].append(unit)
            loads[rank] += self.forward_tokens(unit)
        # Every move makes one more unit (each keeps a sample), so this ends within len(self) moves.
        while self.share_prompts:
            busy, idle = max(range(ranks), key=lambda r: (loads[r], -r)), min(range(ranks), key=lambda r: (loads[r], r))
            moves = [self._split(unit, loads[busy], loads[idle]) + (k,) for k, unit in enumerate(owned[busy])]
            peak, moved, k = min(moves, default=(loads[busy], [], 0))
            if peak >= loads[busy]:
                break
            owned[busy][k] = [i for i in owned[busy][k] if i not in moved]
            owned[idle].append(moved)
            tokens = self.forward_tokens(moved) - len(self.prompts[moved[0]])
            loads[busy] -= tokens
            loads[idle] += tokens + len(self.prompts[moved[0]])
        return [[[i for unit in group for i in unit] for group in self._by_width(units, max_tokens)] for units in owned]

    def _split(self, unit: list[int], busy: int, idle: int) -> tuple[int, list[int]]:
        """Which of `unit`'s samples to move from a rank with `busy` forward tokens to one with
        `idle`, and the larger of the two ranks' loads after the move: completions whose tokens
        come closest to evening the two (half the gap less the prompt), longest first, at least one
        sample kept; (busy, []) when no move lowers that larger load."""
        prompt = len(self.prompts[unit[0]])
        target = (busy - idle - prompt) / 2
        tokens = lambda i: max(len(self.completions[i]) - 1, 0)  # noqa: E731  (forward_tokens' count)
        candidates = sorted(unit, key=lambda i: (-len(self.completions[i]), i))[: len(unit) - 1]
        moved, total = [], 0
        for i in candidates:
            if total + tokens(i) <= target:
                moved.append(i)
                total += tokens(i)
        over = [i for i in candidates if i not in moved and abs(total + tokens(i) - target) < abs(total - target)]
        if over:  # one more, overshooting the target by less than the greedy fill falls short of it
            best = min(over, key=lambda i: (abs(total + tokens(i) - target), i))
            moved.append(best)
            total += tokens(best)
        peak = max(busy - total, idle + prompt + total)
        if total == 0 or peak >= busy:
            return busy, []
        return peak, sorted(moved, key=lambda i: (len(self.completions[i]), i))

    def _by_width(self, units: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
        groups, current, width = [], [], 0
        for unit in sorted(units, key=self.width):
            w = max(width, self.width(unit))
            if current and w * (len(current) + 1) > max_tokens:
                groups.append(current)
                current, w = [], self.width(unit)
            current.append(unit)
            width = w
        if current:
            groups.append(current)
        return groups


def response_hidden(model, batch: Batch, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the rows that predict each completion token: [b, T, H] and mask [b, T]."""
    if batch.share_prompts:
        return _shared_response_hidden(model, batch, idx)
    seqs = [batch.prompts[i] + batch.completions[i] for i in idx]
    hidden = hidden_states(model, *padded_batch(seqs))
    t = max(1, max(len(batch.completions[i]) for i in idx))
    rows = torch.zeros(len(idx), t, dtype=torch.long)
    mask = torch.zeros(len(idx), t)
    for r, i in enumerate(idx):
        p, c = len(batch.prompts[i]), len(batch.completions[i])
        rows[r, :c] = torch.arange(p - 1, p + c - 1)
        mask[r, :c] = 1
    picked = hidden.gather(1, rows.to(hidden.device)[:, :, None].expand(-1, -1, hidden.shape[-1]))
    return picked, mask


def _shared_response_hidden(model, batch: Batch, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """response_hidden computing each prompt once for the samples of `idx` that share it: the
    forward's tokens are the distinct prompts and the completions but their last tokens, packed
    without padding, and a completion continues its prompt's positions and sees the prompt and
    itself (SharedPromptAttention). A completion's last token is left out: its hidden state predicts
    nothing scored, and no token sees it (later tokens of its completion are the only ones that would)."""
    number: dict[tuple[int, ...], int] = {}  # distinct prompt -> its index
    prompt_of = [number.setdefault(tuple(batch.prompts[i]), len(number)) for i in idx]
    prompts = list(number)
    tokens: list[int] = [t for p in prompts for t in p]
    positions: list[int] = [j for p in prompts for j in range(len(p))]
    tp = max(map(len, prompts))
    tc = max(1, max(len(batch.completions[i]) for i in idx))  # scored tokens per completion
    tf = max(1, tc - 1)  # tokens per completion the forward runs
    prompt_rows = torch.full((len(prompts), tp), -1)
    at = 0
    for j, p in enumerate(prompts):
        prompt_rows[j, : len(p)] = torch.arange(at, at + len(p))
        at += len(p)
    completion_rows = torch.full((len(idx), tf), -1)
    rows = torch.zeros(len(idx), tc, dtype=torch.long)  # the packed token whose hidden state predicts each completion token
    mask = torch.zeros(len(idx), tc)
    for r, (i, p) in enumerate(zip(idx, prompt_of)):
        comp = batch.completions[i]
        n, c = len(prompts[p]), len(comp)
        run = max(c - 1, 0)  # the tokens of it the forward runs: all but the last
        completion_rows[r, :run] = torch.arange(at, at + run)
        # token 0 is predicted at the prompt's last token, token j > 0 at the completion's token j - 1
        rows[r, :c] = torch.cat((prompt_rows[p, n - 1: n], torch.arange(at, at + c - 1)))
        mask[r, :c] = 1
        tokens += comp[:run]
        positions += range(n, n + run)
        at += run
    dev, cfg = model.device, model.config
    model.ensure_positions(tp + tc)
    att = SharedPromptAttention(prompt_rows.to(dev), completion_rows.to(dev),
                                torch.tensor(prompt_of, device=dev),
                                torch.tensor(positions, device=dev), cfg.num_heads, cfg.num_kv_heads)
    hidden = model(torch.tensor(tokens, device=dev), att.positions, att)
    return hidden.index_select(0, rows.reshape(-1).to(dev)).view(len(idx), tc, -1), mask


def completion_logprobs(model, batch: Batch, idx: list[int], params: SamplingParams, entropy: bool = False,
                        entropy_grad: bool = False, logits_chunk: int | None = None):
    """log p(token) of each completion token under the processed distribution: [b, T] (0 where
    masked) and the mask; with entropy=True also each row's entropy H(p) = -sum p log p [b, T],
    differentiable only with entropy_grad (an entropy bonus); otherwise a statistic, computed
    without recording it for the backward pass. With `logits_chunk` and autograd on, the output
    layer runs that many rows at a time and the backward pass computes each piece's logits again
    instead of keeping them (train.logits_chunk)."""
    hidden, mask = response_hidden(model, batch, idx)
    b, t, _ = hidden.shape
    flat = hidden.reshape(b * t, -1)
    keep = mask.reshape(-1).bool()
    targets = torch.zeros(b, t, dtype=torch.long)
    for r, i in enumerate(idx):
        targets[r, : len(batch.completions[i])] = torch.tensor(batch.completions[i])
    rows, tokens = flat[keep.to(flat.device)], targets.reshape(-1)[keep].to(flat.device)
    if logits_chunk and torch.is_grad_enabled() and len(rows):
        parts = [checkpoint(token_logprobs, model, r, k, params, entropy, entropy_grad, use_reentrant=False, preserve_rng_state=False)
                 for r, k in zip(rows.split(logits_chunk), tokens.split(logits_chunk))]
        picked, h = torch.cat([p for p, _ in parts]), torch.cat([e for _, e in parts]) if entropy else None
    else:
        picked, h = token_logprobs(model, rows, tokens, params, entropy, entropy_grad)
    out = torch.zeros(b * t, dtype=torch.float32, device=hidden.device).masked_scatter(keep.to(hidden.device), picked)
    if not entropy:
        return out.view(b, t), mask
    ent = torch.zeros(b * t, dtype=torch.float32, device=hidden.device).masked_scatter(keep.to(hidden.device), h)
    return out.view(b, t), mask, ent.view(b, t)


def token_logprobs(model, hidden: torch.Tensor, tokens: torch.Tensor, params: SamplingParams, entropy: bool = False,
                   entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """From final hidden rows [R, H]: log p of each row's token [R] under the processed
    distribution, and (with `entropy`) each row's entropy [R], differentiable with `entropy_grad`."""
    lp = processed_logprobs(model.logits(hidden), params)
    picked = lp.gather(-1, tokens[:, None]).squeeze(-1)
    if not entropy:
        return picked, None
    if entropy_grad:
        return picked, -(lp.exp() * lp.masked_fill(torch.isinf(lp), 0.0)).sum(-1)
    with torch.no_grad():  # two passes over the [rows, vocabulary] logprobs instead of five
        finite = lp.detach().clamp(min=torch.finfo(lp.dtype).min)  # p log p = 0 where p = 0
        return picked, -finite.mul_(lp.detach().exp()).sum(-1)


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
