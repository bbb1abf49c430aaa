"""The optimizer state sharded over data-parallel ranks (ZeRO stage 1, train.shard_optimizer): each
rank keeps the AdamW moments of a contiguous share of every model's parameter tensors, receives only
that share of the summed gradients (one reduce-scatter where the replicated learner all-reduces),
steps it, and the ranks' updated shares are gathered back into every rank's full weights (one
all-gather). Each parameter is stepped whole by one rank, with the same gradient and the same
global clipping norm as every rank steps it when the state is replicated, so the updates are the
replicated learner's bit for bit wherever its gradient sum is (two ranks: a + b either way)."""

from __future__ import annotations

import torch

from rlhfspec.errors import RlhfspecError


def partition(sizes: list[int], world: int) -> list[int]:
    """Cut points [0, c1, ..., len(sizes)] splitting tensors of these sizes into `world` contiguous
    runs of near-equal total size, each at least one tensor: run r ends at the first boundary at or
    past r + 1 world-ths of the total, or earlier when the later runs would get no tensor."""
    if len(sizes) < world:
        raise RlhfspecError(f"train.workers is {world} but a model has only {len(sizes)} parameter tensors to share the optimizer "
                            "state among; set train.shard_optimizer false.")
    total, cuts, acc, k = sum(sizes), [0], 0, 0
    for r in range(1, world):
        target = total * r / world
        while k < len(sizes) - (world - r) and (k < cuts[-1] + 1 or acc + sizes[k] / 2 <= target):
            acc += sizes[k]
            k += 1
        cuts.append(k)
    return cuts + [len(sizes)]


class Shards:
    """Rank `rank` of `world`'s share of `groups` (lists of parameters, one per optimizer: the
    policy's, the critic's with its value head), and the two collectives around its optimizer steps.
    The reduce-scatter's buffer holds each rank's segment in turn: its parameters' gradients, one
    has-a-gradient flag per parameter, then zeros up to the longest segment."""

    def __init__(self, groups: list[list[torch.nn.Parameter]], rank: int, world: int):
        self.groups, self.rank, self.world = groups, rank, world
        cuts = [partition([p.numel() for p in g], world) for g in groups]
        # ranks[r]: rank r's parameters, each group's share in turn; index[r]: their places in their groups
        self.index = [[list(range(c[r], c[r + 1])) for c in cuts] for r in range(world)]
        self.ranks = [[g[i] for g, idx in zip(groups, self.index[r]) for i in idx] for r in range(world)]
        self.width = max(sum(p.numel() + 1 for p in params) for params in self.ranks)

    def owned(self, group: int) -> list[torch.nn.Parameter]:
        """This rank's parameters of group `group`, which its optimizer for that group steps."""
        return [self.groups[group][i] for i in self.index[self.rank][group]]

    def reduce_scatter(self) -> None:
        """Sum the ranks' gradients into this rank's parameters (float32, None where no rank has one)
        and drop every other parameter's gradient."""
        import torch.distributed as dist

        device = self.groups[0][0].device
        pieces = []
        for params in self.ranks:
            pieces += [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device) for p in params]
            pieces.append(torch.tensor([float(p.grad is not None) for p in params], device=device))
            pieces.append(torch.zeros(self.width - sum(p.numel() + 1 for p in params), device=device))
        flat, mine = torch.cat(pieces), torch.empty(self.width, device=device)
        dist.reduce_scatter_tensor(mine, flat)
        del flat, pieces
        for g in self.groups:
            for p in g:
                p.grad = None
        params = self.ranks[self.rank]
        total = sum(p.numel() for p in params)
        flags, offset = mine[total:total + len(params)].tolist(), 0
        for p, has in zip(params, flags):
            if has:
                p.grad = mine[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    def all_gather(self) -> None:
        """Every rank's updated parameters into every rank's models."""
        import torch.distributed as dist

        device = self.groups[0][0].device
        params = self.ranks[self.rank]
        used = sum(p.numel() for p in params)
        mine = torch.cat([*(p.detach().reshape(-1).float() for p in params), torch.zeros(self.width - used, device=device)])
        flat = torch.empty(self.width * self.world, device=device)
        dist.all_gather_into_tensor(flat, mine)
        with torch.no_grad():
            for r, params in enumerate(self.ranks):
                if r == self.rank:
                    continue
                offset = r * self.width
                for p in params:
                    p.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    def norm(self, group: int, sharded: bool) -> torch.Tensor:
        """The 2-norm of group `group`'s gradients over every rank (the norm of the per-parameter
        norms, in parameter order, as torch's clip_grad_norm_ takes it). `sharded`: each rank holds
        only its own parameters' gradients and the per-parameter norms are all-reduced (one rank
        adds each, the others zeros); otherwise every rank holds them all. Both ways compute the
        same per-parameter norms and the same final norm over them, so they agree bit for bit."""
        import torch.distributed as dist

        params = self.groups[group]
        held = set(self.index[self.rank][group]) if sharded else range(len(params))
        device = params[0].device
        norms, flags = torch.zeros(len(params), device=device), torch.zeros(len(params), device=device)
        for i in held:
            if params[i].grad is not None:
                norms[i] = torch.linalg.vector_norm(params[i].grad, 2.0)
                flags[i] = 1.0
        if sharded:
            both = torch.cat([norms, flags])
            dist.all_reduce(both)
            norms, flags = both[:len(params)], both[len(params):]
        return torch.linalg.vector_norm(norms[flags > 0], 2.0)


def clip(params: list[torch.nn.Parameter], max_norm: float, total: torch.Tensor) -> None:
    """Scale the gradients these parameters hold by max_norm / total where that is below 1 (as torch's
    clip_grad_norm_ does, from a norm taken over every rank)."""
    grads = [p for p in params if p.grad is not None]
    if grads:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)


def merge_states(states: list[dict]) -> dict:
    """One optimizer state dict, as a single optimizer over the whole group would give it, from the
    ranks' `global_state` shares (for checkpoints, which load under any number of ranks)."""
    merged = {"state": {}, "param_groups": [{**states[0]["param_groups"][0], "params": []}]}
    for s in states:
        merged["state"].update(s["state"])
        merged["param_groups"][0]["params"] += s["param_groups"][0]["params"]
    merged["param_groups"][0]["params"].sort()
    merged["state"] = dict(sorted(merged["state"].items()))
    return merged


def global_state(state: dict, index: list[int]) -> dict:
    """An optimizer's state dict over parameters `index` of its group, renumbered by those places."""
    return {"state": {index[i]: s for i, s in state["state"].items()},
            "param_groups": [{**state["param_groups"][0], "params": [index[i] for i in state["param_groups"][0]["params"]]}]}


def local_state(state: dict, index: list[int]) -> dict:
    """The part of a whole group's optimizer state dict for parameters `index`, numbered as an
    optimizer over just those parameters numbers them."""
    place = {g: i for i, g in enumerate(index)}
    return {"state": {place[g]: s for g, s in state["state"].items() if g in place},
            "param_groups": [{**state["param_groups"][0], "params": list(range(len(index)))}]}
