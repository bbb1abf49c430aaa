"""The optimizer state sharded over data-parallel ranks (ZeRO stage 1, train.shard_optimizer): each
rank keeps the AdamW moments of a contiguous share of every model's parameter tensors, receives only
that share of the summed gradients (a reduce-scatter where the replicated learner all-reduces),
steps it, and the ranks' updated shares are broadcast back into every rank's full weights. Each
parameter is stepped whole by one rank, with the same gradient and the same global clipping norm
as every rank steps it when the state is replicated, so the updates are the replicated learner's
bit for bit wherever its gradient sum is (two ranks: a + b either way).
With shares of equal size NCCL's reduce-scatter and the broadcasts move what one all-reduce does (each
rank's segment is padded to the largest share); on gloo (the CPU) the gradients are all-reduced as
when replicated, so there sharding saves memory and costs the weights' broadcasts on top."""

from __future__ import annotations

import torch

from rlhfspec.errors import RlhfspecError


def partition(sizes: list[int], world: int) -> list[int]:
    """Cut points [0, c1, ..., len(sizes)] splitting tensors of these sizes into `world` contiguous
    runs of near-equal total size, each at least one tensor: run r ends at the tensor boundary
    nearest r + 1 world-ths of the total (a tensor goes to the run its middle falls in), moved
    where a run would otherwise get no tensor. Whole tensors: a run can exceed its share by up to one
    tensor (an embedding larger than 1/world of the model is a share of its own)."""
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

    def places(self, group: int) -> list[int]:
        """The places in group `group` of this rank's parameters."""
        return self.index[self.rank][group]

    def owned(self, group: int) -> list[torch.nn.Parameter]:
        """This rank's parameters of group `group`, which its optimizer for that group steps."""
        return [self.groups[group][i] for i in self.places(group)]

    def reduce_scatter(self) -> None:
        """Sum the ranks' gradients into this rank's parameters (float32, None where no rank has one)
        and drop every other parameter's gradient. Each gradient is dropped as soon as it is copied
        into the buffer (`pack_gradients`). Every rank's segment is as long as the largest share,
        so unequal shares send padding. NCCL reduce-scatters the buffer; gloo, whose reduce-scatter
        all-reduces a copy of the whole buffer, all-reduces it in place and keeps this rank's segment."""
        import torch.distributed as dist

        device = self.groups[0][0].device
        flat = torch.empty(self.world * self.width, device=device)
        for r, params in enumerate(self.ranks):
            end = pack_gradients(flat, r * self.width, params)
            flat[end:(r + 1) * self.width].zero_()
        if dist.get_backend() == "gloo":
            dist.all_reduce(flat)
            mine = flat[self.rank * self.width:(self.rank + 1) * self.width].clone()
        else:
            mine = torch.empty(self.width, device=device)
            dist.reduce_scatter_tensor(mine, flat)
        del flat  # (the buffer goes; `mine` holds this rank's sums)
        unpack_gradients(mine, 0, self.ranks[self.rank])

    def share_weights(self) -> None:
        """Every rank's updated parameters into every rank's models: each rank's share broadcast
        from it in turn (the traffic of an all-gather, with a buffer of one share at a time)."""
        import torch.distributed as dist

        device = self.groups[0][0].device
        for r, params in enumerate(self.ranks):
            if r == self.rank:
                buffer = torch.cat([p.detach().reshape(-1).float() for p in params])
            else:
                buffer = torch.empty(sum(p.numel() for p in params), device=device)
            dist.broadcast(buffer, src=r)
            if r != self.rank:
                offset = 0
                with torch.no_grad():
                    for p in params:
                        p.copy_(buffer[offset:offset + p.numel()].view_as(p))
                        offset += p.numel()
            del buffer


def pack_gradients(flat: torch.Tensor, offset: int, params: list[torch.nn.Parameter]) -> int:
    """Copy these parameters' gradients (float32, zeros where a parameter has none) into `flat` from
    `offset` on, then one has-a-gradient flag per parameter; where that ends. Each gradient is
    dropped as soon as it is copied (on the CPU, where a large buffer's pages are committed as they
    are written and a large freed gradient goes back to the OS, buffer and gradients together take
    about what the gradients did; on a GPU the whole buffer is reserved at once)."""
    flags = torch.tensor([float(p.grad is not None) for p in params], device=flat.device)
    for p in params:
        piece = flat[offset:offset + p.numel()]
        if p.grad is None:
            piece.zero_()
        else:
            piece.copy_(p.grad.reshape(-1))
        p.grad = None
        offset += p.numel()
    flat[offset:offset + len(params)] = flags
    return offset + len(params)


def unpack_gradients(flat: torch.Tensor, offset: int, params: list[torch.nn.Parameter]) -> int:
    """The inverse of pack_gradients over a summed buffer: each parameter some rank had a gradient
    for gets its sum (a view of `flat`, in the parameter's dtype), the others none; where it ends."""
    total = sum(p.numel() for p in params)
    flags = flat[offset + total:offset + total + len(params)].tolist()
    for p, has in zip(params, flags):
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype) if has else None
        offset += p.numel()
    return offset + len(params)


def global_norm(params: list[torch.nn.Parameter], held: list[int] | None = None) -> torch.Tensor:
    """The 2-norm of these parameters' gradients over every rank (the norm of the per-parameter
    norms, in parameter order, as torch's clip_grad_norm_ takes it). `held`: the places of the
    parameters whose gradients this rank holds (sharded), their norms all-reduced with the other
    ranks' (one rank adds each, the others zeros); None: this rank holds every gradient. Both ways
    take the same per-parameter norms, each from a 64-byte-aligned gradient (a view into a summed
    buffer may start anywhere, and a GPU reduction's order follows its alignment), and the same
    norm over them, so they agree bit for bit."""
    device = params[0].device
    norms, flags = torch.zeros(len(params), device=device), torch.zeros(len(params), device=device)
    for i in range(len(params)) if held is None else held:
        g = params[i].grad
        if g is not None:
            norms[i] = torch.linalg.vector_norm(g if g.data_ptr() % 64 == 0 else g.clone(), 2.0)
            flags[i] = 1.0
    if held is not None:
        import torch.distributed as dist

        both = torch.cat([norms, flags])
        dist.all_reduce(both)
        norms, flags = both[:len(params)], both[len(params):]
    return torch.linalg.vector_norm(norms[flags > 0], 2.0)


def clip(params: list[torch.nn.Parameter], max_norm: float, total: torch.Tensor) -> None:
    """Scale the gradients these parameters hold by max_norm / (total + 1e-6) where that is below 1,
    as torch's clip_grad_norm_ does, from a norm taken over every rank."""
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)


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


def local_state(state: dict, index: list[int], size: int) -> dict:
    """The part of a whole group's optimizer state dict (of `size` parameters) for parameters
    `index`, numbered as an optimizer over just those parameters numbers them."""
    if len(state["param_groups"][0]["params"]) != size:
        raise RlhfspecError(f"the checkpoint's optimizer state is for {len(state['param_groups'][0]['params'])} parameter tensors "
                            f"but the model has {size}.")
    place = {g: i for i, g in enumerate(index)}
    return {"state": {place[g]: s for g, s in state["state"].items() if g in place},
            "param_groups": [{**state["param_groups"][0], "params": list(range(len(index)))}]}
