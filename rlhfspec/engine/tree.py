"""Speculative trees: k draft chains per sample that share their first position, verified in one
forward with a tree mask.

Layout of a sample's new rows: [last, branch 0's d_1..d_n, branch 1's d_1..d_n, ...]; node (i, j)
sits at position start + 1 + j and sees the prefix, `last` and branch i's nodes up to itself.

Verification keeps the output distribution exact (multi-round rejection as in SpecInfer, Miao et
al. 2024, with drafts without replacement as in recursive rejection sampling, Jeon et al. 2024):
candidate i comes with the distribution q_i it was drawn from given the candidates before it (the
drafter's q without them, renormalised); it is accepted with probability min(1, r_i(c_i) / q_i(c_i))
where r_0 = p_1 and each rejection replaces r by norm(max(0, r - q_i)). Each round is an exact
speculative step whose target is the previous round's residual and whose draft is drawn from the
q_i it declares, so the token emitted at the first position is distributed as p_1 (a rejected
candidate has r_{i+1} = 0 there, so drawing the next ones without it loses nothing). After an accepted candidate the rest of
its branch is an ordinary chain (verify.py's rule). If every candidate is rejected, the token is
drawn from the last residual. With one branch this is exactly the chain rule, with the same
uniforms. Greedy: follow the branch whose first draft is p_1's argmax, then the chain rule.
"""

from __future__ import annotations

import torch

from rlhfspec.engine.sampling import ACCEPT, RESIDUAL, SAMPLE, group_rows, processed_logprobs, sample
from rlhfspec.engine.sequence import Sequence, uniforms
from rlhfspec.engine.verify import Verdict, _index, _starts, acceptance_probability, residual_distribution
from rlhfspec.models.attention import TreeRows
from rlhfspec.models.invariance import rowwise


def branch_purposes(i: int) -> tuple[int, int]:
    """(purpose of branch i's draft draws, of its first-position acceptance test): branch 0 uses
    plain sampling's and the chain's own, so a one-branch tree is a chain draw for draw."""
    return (SAMPLE, ACCEPT) if i == 0 else (1 + 2 * i, 2 + 2 * i)


def tree_rows(starts: list[int], depths: list[int], branches: int) -> TreeRows:
    """The verification forward's layout: sample b's `branches` chains of depths[b] drafts after its
    last token, written from cache row starts[b] (a sample with depth 0 feeds its last token only)."""
    positions, seen = [], []
    for start, n in zip(starts, depths):
        k = branches if n else 0
        positions.append([start] + [start + 1 + j for _ in range(k) for j in range(n)])
        rows = [[start]]
        for i in range(k):
            first = start + 1 + i * n
            rows += [[start] + list(range(first, first + j + 1)) for j in range(n)]
        seen.append(rows)
    return TreeRows(positions, list(starts), seen)


def verify_tree(seqs: list[Sequence], logits: torch.Tensor, drafts: list[list[int]], q: torch.Tensor | None,
                branches: int) -> tuple[Verdict, list[list[int]]]:
    """Accept or reject every sample's tree. logits: [sum(1 + len(d_b)), V] of the rows laid out by
    `tree_rows`; drafts[b]: `branches` chains of equal length, branch-major; q: [sum len(d_b), V]
    their processed probabilities (None: one-hot drafts). Returns the verdict and, per sample, the
    new rows its cache keeps (the root, then the accepted path's nodes), counted from its root.

    Tensor work is batched over samples (the first position's rounds over k, the chains' tests
    at every node at once); Python walks only the accepted branch's precomputed coin flips."""
    dev = logits.device
    k = branches
    depth = [len(d) // k for d in drafts]
    root = _starts([1 + len(d) for d in drafts])
    qstart = _starts([len(d) for d in drafts])
    lp = torch.empty(logits.shape, dtype=torch.float32, device=dev)
    for params, members in group_rows([s.params for s in seqs]).items():
        rows = _index([r for b in members for r in range(root[b], root[b] + 1 + len(drafts[b]))], lp)
        lp[rows] = processed_logprobs(logits[rows], params)
    p = rowwise(torch.exp, lp)
    best = lp.argmax(-1).tolist()
    greedy = [s.params.greedy for s in seqs]

    def node(b: int, i: int, j: int) -> int:  # row of branch i's draft j (0-based)
        return root[b] + 1 + i * depth[b] + j

    def parent(b: int, i: int, j: int) -> int:  # the row its distribution is read at
        return root[b] if j == 0 else node(b, i, j - 1)

    # Every node's own test along its chain: min(1, p(d)/q(d)) at its parent's row.
    nodes = [(b, i, j) for b in range(len(seqs)) for i in range(k if depth[b] else 0) for j in range(depth[b])]
    chain_ok = {}
    if nodes:
        tok = torch.tensor([drafts[b][i * depth[b] + j] for b, i, j in nodes], device=dev)
        pd = p[_index([parent(*x) for x in nodes], p), tok]
        if q is None:
            acc = pd.clamp(max=1.0)
        else:
            qd = q[_index([qstart[b] + i * depth[b] + j for b, i, j in nodes], q), tok]
            acc = torch.where(qd > 0, (pd / qd.clamp(min=torch.finfo(qd.dtype).tiny)).clamp(max=1.0), torch.ones_like(pd))
        later = [x for x in nodes if x[2] > 0]
        coins = _coins([seqs[b] for b, _, _ in later], [j for _, _, j in later], ACCEPT, dev)
        flat = dict(zip(nodes, acc.tolist()))
        chain_ok = {x: greedy[x[0]] and best[parent(*x)] == drafts[x[0]][x[1] * depth[x[0]] + x[2]] or
                    not greedy[x[0]] and c < flat[x] for x, c in zip(later, coins)}
    branch, residual = _first_position(seqs, p, drafts, q, depth, root, qstart, best, greedy, k)
    # Walk each sample's accepted branch; note where its last token is drawn from.
    tokens, paths, finals = [], [], []  # finals[b]: (kind, row, node) with kind "root", "residual" or "bonus"
    for b, s in enumerate(seqs):
        i, n = branch[b], depth[b]
        if i is None:
            tokens.append([])
            paths.append([0])
            finals.append(("root", root[b], None))
            continue
        accepted = 1
        while accepted < n and chain_ok[(b, i, accepted)]:
            accepted += 1
        tokens.append(drafts[b][i * n : i * n + accepted])
        paths.append([0] + [node(b, i, j) - root[b] for j in range(accepted)])
        finals.append(("residual", parent(b, i, accepted), (b, i, accepted)) if accepted < n else ("bonus", node(b, i, n - 1), None))
    last = _last_tokens(seqs, p, q, drafts, depth, qstart, best, greedy, residual, branch, finals, [len(t) for t in tokens], k)
    verdict = Verdict([], [], [])
    for b, (ts, path) in enumerate(zip(tokens, paths)):
        verdict.tokens.append(ts + [last[b]])
        verdict.accepted.append(len(ts))
    rows = _index([root[b] + r for b, path in enumerate(paths) for r in path], lp)
    chosen = lp[rows, torch.tensor([t for ts in verdict.tokens for t in ts], device=dev)].tolist()
    for start, ts in zip(_starts([len(t) for t in verdict.tokens]), verdict.tokens):
        verdict.logprobs.append(chosen[start : start + len(ts)])
    return verdict, paths


def _first_position(seqs, p, drafts, q, depth, root, qstart, best, greedy, k) -> tuple[list[int | None], dict[int, torch.Tensor]]:
    """The multi-round test of the k first drafts, for all samples at once: per sample the
    accepted branch (None: all rejected, or no drafts) and, for sampled samples that rejected
    every candidate, the last residual [V]."""
    dev = p.device
    branch: list[int | None] = [None] * len(seqs)
    for b in range(len(seqs)):
        if greedy[b] and depth[b]:
            branch[b] = next((i for i in range(k) if drafts[b][i * depth[b]] == best[root[b]]), None)
    live = [b for b in range(len(seqs)) if depth[b] and not greedy[b]]
    if not live:
        return branch, {}
    r = p[_index([root[b] for b in live], p)]
    open_ = torch.ones(len(live), dtype=torch.bool, device=dev)
    for i in range(k):
        c = torch.tensor([drafts[b][i * depth[b]] for b in live], device=dev)
        qi = None if q is None else q[_index([qstart[b] + i * depth[b] for b in live], q)]
        acc = acceptance_probability(r, qi, c)
        u = uniforms([seqs[b] for b in live], [seqs[b].length for b in live], branch_purposes(i)[1], dev)
        took = open_ & (u < acc)
        for a in took.nonzero().flatten().tolist():
            branch[live[a]] = i
        open_ &= ~took
        if not bool(open_.any()):
            break
        r = torch.where(open_[:, None], residual_distribution(r, qi, c), r)
    return branch, {b: r[a] for a, b in enumerate(live) if branch[b] is None}


def _last_tokens(seqs, p, q, drafts, depth, qstart, best, greedy, residual, branch, finals, accepted, k) -> list[int]:
    """Each sample's corrected or bonus token: drawn from the first position's last residual, a
    chain residual norm(max(0, p - q)) or p after the whole branch (greedy: the argmax there)."""
    dev = p.device
    out = [best[row] for _, row, _ in finals]
    sampled = [b for b in range(len(seqs)) if not greedy[b]]
    if not sampled:
        return out
    dist = p[_index([finals[b][1] for b in sampled], p)]
    purposes = []
    redo = [a for a, b in enumerate(sampled) if finals[b][0] == "residual"]
    if redo:
        xs = [finals[sampled[a]][2] for a in redo]
        tok = torch.tensor([drafts[b][i * depth[b] + j] for b, i, j in xs], device=dev)
        qr = None if q is None else q[_index([qstart[b] + i * depth[b] + j for b, i, j in xs], q)]
        at = _index(redo, dist)
        dist[at] = residual_distribution(dist[at], qr, tok)
    for a, b in enumerate(sampled):
        kind = finals[b][0]
        if kind == "root" and b in residual:
            dist[a] = residual[b]
        purposes.append(SAMPLE if kind == "bonus" or (kind == "root" and b not in residual) else RESIDUAL)
    u = torch.empty(len(sampled), dtype=torch.float64, device=dev)
    for purpose in (SAMPLE, RESIDUAL):
        idx = [a for a, pur in enumerate(purposes) if pur == purpose]
        if idx:
            u[_index(idx, u)] = uniforms([seqs[sampled[a]] for a in idx], [seqs[sampled[a]].length + accepted[sampled[a]] for a in idx], purpose, dev)
    drawn = sample(rowwise(torch.log, dist), u, greedy=False).tolist()
    for a, b in enumerate(sampled):
        out[b] = drawn[a]
    return out


def _coins(seqs: list[Sequence], offsets: list[int], purpose: int, dev) -> list[float]:
    """Keyed uniforms at each sample's length + offset."""
    if not seqs:
        return []
    return uniforms(seqs, [s.length + j for s, j in zip(seqs, offsets)], purpose, dev).tolist()
