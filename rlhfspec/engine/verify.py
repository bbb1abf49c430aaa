"""Lossless speculative verification: accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the
first rejection draw from norm(max(0, p_j - q_j)); if every draft is accepted draw a bonus token from
p_{n+1}. The emitted tokens are distributed exactly as plain sampling from p (Leviathan et al. 2023;
Chen et al. 2023). Greedy: accept while the argmax matches.

p and q are the *processed* distributions (same temperature, top-k, top-p), so the guarantee holds
for the distribution tokens are actually drawn from. Every random number is keyed by
(seed, sample_id, position, purpose), so a sample's outcome does not depend on its batch. One-hot
drafts (n-gram) are verified with plain sampling's own uniforms, so they change no sampled token at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfspec.engine.sampling import ACCEPT, RESIDUAL, SAMPLE, group_rows, processed_logprobs, sample
from rlhfspec.engine.sequence import Sequence, uniforms
from rlhfspec.models.invariance import rowwise


def acceptance_probability(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor) -> torch.Tensor:
    """min(1, p(d)/q(d)) per row: p, q [R, V] probabilities (q None = one-hot drafts), drafts [R]."""
    pd = p.gather(-1, drafts[:, None]).squeeze(-1)
    if q is None:
        return pd.clamp(max=1.0)
    qd = q.gather(-1, drafts[:, None]).squeeze(-1)
    return torch.where(qd > 0, (pd / qd.clamp(min=torch.finfo(qd.dtype).tiny)).clamp(max=1.0), torch.ones_like(pd))


def residual_distribution(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) per row [R, V]; with one-hot q this is p with the draft removed, renormalised.

    A rejection implies p(d) < q(d), so the residual has positive mass; rows where rounding leaves
    none fall back to p (their rejection probability is zero up to rounding).
    """
    if q is None:
        r = p.scatter(-1, drafts[:, None], 0.0)
    else:
        r = (p - q).clamp(min=0.0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


@dataclass(slots=True)
class Verdict:
    """Per sample: emitted tokens (accepted drafts, then one corrected or bonus token), their
    policy logprobs, and how many drafts were accepted."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    accepted: list[int]


def verify(seqs: list[Sequence], logits: torch.Tensor, drafts: list[list[int]], q: torch.Tensor | None) -> Verdict:
    """Accept or reject every sample's drafts in one pass.

    logits: [sum(n_b + 1), V] policy logits of the rows fed for each sample, [last, d_1..d_n], in
    sample order; drafts[b]: sample b's n_b draft tokens; q: [sum n_b, V] the drafts' processed
    probabilities, or None for one-hot (deterministic) drafts.
    """
    verdict = Verdict([[] for _ in seqs], [[] for _ in seqs], [0] * len(seqs))
    row0 = _starts([len(d) + 1 for d in drafts])
    q0 = _starts([len(d) for d in drafts])
    for params, members in group_rows([s.params for s in seqs]).items():
        rows = [r for b in members for r in range(row0[b], row0[b] + len(drafts[b]) + 1)]
        qrows = [r for b in members for r in range(q0[b], q0[b] + len(drafts[b]))]
        group_q = None if q is None or not qrows else q[_index(qrows, q)]
        part = _verify_group(params, [seqs[b] for b in members], logits[_index(rows, logits)], [drafts[b] for b in members], group_q)
        for i, b in enumerate(members):
            verdict.tokens[b], verdict.logprobs[b], verdict.accepted[b] = part.tokens[i], part.logprobs[i], part.accepted[i]
    return verdict


def _verify_group(params, seqs, logits, drafts, q) -> Verdict:
    """verify() for samples sharing one SamplingParams; the rows of logits and q are theirs alone."""
    dev = logits.device
    lp = processed_logprobs(logits, params)
    local = _starts([len(d) + 1 for d in drafts])
    draft_rows = [local[i] + j for i, d in enumerate(drafts) for j in range(len(d))]
    flat = torch.tensor([t for d in drafts for t in d], dtype=torch.long, device=dev)
    if params.greedy:
        choice = lp.argmax(-1)
        ok = (choice[_index(draft_rows, lp)] == flat).tolist() if draft_rows else []
    elif q is None:
        # One-hot drafts: accept d_j iff plain sampling at its position (same uniform) draws d_j, and
        # emit that plain draw at the first mismatch. P(accept) = p(d_j), and a mismatching draw is
        # distributed as p without d_j, renormalised: the rule above, coupled so that the emitted
        # tokens are the very tokens plain decoding draws, whichever steps the selector drafts on.
        keys = [(s, s.length + j) for s, d in zip(seqs, drafts) for j in range(len(d) + 1)]
        coupled = sample(lp, _keyed(keys, SAMPLE, dev), greedy=False)
        ok = (coupled[_index(draft_rows, lp)] == flat).tolist() if draft_rows else []
    else:
        p = rowwise(torch.exp, lp)
        ok = []
        if draft_rows:
            keys = [(s, s.length + j) for s, d in zip(seqs, drafts) for j in range(len(d))]
            ok = (_keyed(keys, ACCEPT, dev) < acceptance_probability(p[_index(draft_rows, p)], q, flat)).tolist()
    accepted, cursor = [], 0
    for d in drafts:  # the first rejection ends a sample's run of accepted drafts
        flags = ok[cursor : cursor + len(d)]
        cursor += len(d)
        accepted.append(next((j for j, f in enumerate(flags) if not f), len(d)))
    final_rows = _index([local[i] + k for i, k in enumerate(accepted)], lp)
    rejected = [i for i, (k, d) in enumerate(zip(accepted, drafts)) if k < len(d)]
    if params.greedy:
        final = choice[final_rows]
    elif q is None:
        final = coupled[final_rows]
    else:
        dist = p[final_rows]
        if rejected:
            at = _index(rejected, dist)
            qr = q[_index([_starts([len(d) for d in drafts])[i] + accepted[i] for i in rejected], q)]
            dr = torch.tensor([drafts[i][accepted[i]] for i in rejected], dtype=torch.long, device=dev)
            dist[at] = residual_distribution(dist[at], qr, dr)
        u = torch.empty(len(seqs), dtype=torch.float64, device=dev)
        for purpose, idx in ((RESIDUAL, rejected), (SAMPLE, [i for i in range(len(seqs)) if i not in set(rejected)])):
            if idx:
                u[_index(idx, u)] = _keyed([(seqs[i], seqs[i].length + accepted[i]) for i in idx], purpose, dev)
        final = sample(rowwise(torch.log, dist), u, greedy=False)
    final = final.tolist()
    tokens = [d[:k] + [f] for d, k, f in zip(drafts, accepted, final)]
    emit_rows = [r for i, k in enumerate(accepted) for r in range(local[i], local[i] + k + 1)]
    chosen = lp[_index(emit_rows, lp), torch.tensor([t for ts in tokens for t in ts], device=dev)].tolist()
    starts = _starts([len(t) for t in tokens])
    logprobs = [chosen[a : a + len(t)] for a, t in zip(starts, tokens)]
    return Verdict(tokens, logprobs, accepted)


def _starts(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for k in sizes:
        out.append(acc)
        acc += k
    return out


def _index(rows: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=like.device)


def _keyed(keys: list[tuple[Sequence, int]], purpose: int, dev) -> torch.Tensor:
    """Keyed uniforms for (sample, position) pairs."""
    return uniforms([s for s, _ in keys], [pos for _, pos in keys], purpose, dev)
