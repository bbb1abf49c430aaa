"""The sharded optimizer (rlhfspec/rl/zero.py): how the parameters are dealt to the ranks, the
ranks' optimizer states renumbered, merged and split again, and one sharded step over 3 gloo
processes against one optimizer over the summed gradients. Against the replicated state, bit for
bit, at 2 ranks: tests/rl/test_distributed.py."""

import socket

import pytest
import torch

from rlhfspec import RlhfspecError
from rlhfspec.rl.zero import Shards, clip, global_norm, global_state, local_state, merge_states, partition

SHAPES = ([(7,), (3, 5), (11,), (2, 2), (13,), (6,)], [(5,), (3,), (4,)])  # a policy's tensors and a critic's
NO_GRAD = (0, 3)  # (group, place): no rank has a gradient for it (AdamW leaves it alone)


@pytest.mark.parametrize("sizes, world", [([10, 1, 1, 1, 10], 2), ([28, 3, 3, 3, 3, 3, 3, 3, 3, 1], 2), ([5, 5, 5], 3),
                                          ([100, 1, 1, 1], 4), ([1] * 7, 3), ([3, 9, 2, 7, 7, 1, 4], 3)])
def test_every_rank_gets_a_contiguous_nonempty_run_of_near_equal_size(sizes, world):
    cuts = partition(sizes, world)
    assert cuts[0] == 0 and cuts[-1] == len(sizes) and len(cuts) == world + 1
    assert all(a < b for a, b in zip(cuts, cuts[1:]))  # every rank steps at least one tensor
    loads = [sum(sizes[a:b]) for a, b in zip(cuts, cuts[1:])]
    assert max(loads) <= sum(sizes) / world + max(sizes)  # each cut within a tensor of its share's end


def test_the_embedding_heavy_policy_splits_near_half():
    """SmolLM2-135M's shape: a 28.3M embedding, then 30 layers of 3.5M (as 9 tensors each), a norm."""
    layer = [331_776, 110_592, 110_592, 331_776, 884_736, 884_736, 884_736, 576, 576]
    sizes = [28_311_552, *layer * 30, 576]
    loads = [sum(sizes[a:b]) for a, b in zip(*(lambda c: (c, c[1:]))(partition(sizes, 2)))]
    assert abs(loads[0] - loads[1]) <= max(sizes[1:])  # within one tensor of an even split


def test_fewer_tensors_than_ranks_is_one_sentence():
    with pytest.raises(RlhfspecError, match=r"^train.workers is 4 but a model has only 3 parameter tensors to share the optimizer "
                                            r"state among; set train.shard_optimizer false\.$"):
        partition([1, 2, 3], 4)


def test_shares_renumbered_and_merged_are_the_whole_optimizers_state():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 5, 2, 4, 6)]
    whole = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    whole.step()
    full = whole.state_dict()
    shares = [[0, 1], [2, 3, 4]]
    parts = []
    for index in shares:  # an optimizer over each share, loaded from the whole state, gives it back
        own = torch.optim.AdamW([params[i] for i in index], lr=0.1)
        own.load_state_dict(local_state(full, index, len(params)))
        assert [s["step"] for s in own.state.values()] == [full["state"][i]["step"] for i in index]
        assert all(torch.equal(own.state[params[i]]["exp_avg"], full["state"][i]["exp_avg"]) for i in index)
        parts.append(global_state(own.state_dict(), index))
    merged = merge_states(parts[::-1])  # in any order
    assert merged["param_groups"] == full["param_groups"]
    assert list(merged["state"]) == list(full["state"])
    assert all(torch.equal(merged["state"][i][k], full["state"][i][k]) for i in full["state"] for k in full["state"][i])


def test_a_state_for_another_number_of_tensors_is_one_sentence():
    state = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}]}
    with pytest.raises(RlhfspecError, match=r"^the checkpoint's optimizer state is for 3 parameter tensors but the model has 5\.$"):
        local_state(state, [3, 4], 5)


def _groups() -> list[list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    return [[torch.nn.Parameter(torch.randn(shape)) for shape in shapes] for shapes in SHAPES]


def _grads(groups, rank: int) -> None:
    g = torch.Generator().manual_seed(100 + rank)
    for k, group in enumerate(groups):
        for i, p in enumerate(group):
            p.grad = None if (k, i) == NO_GRAD else torch.randn(p.shape, generator=g) * (rank + 1)


def _sharded_step(rank: int, world: int, address: str, out: str) -> None:
    """One rank: its gradients summed into its share, clipped by the global norm, its share stepped (SGD),
    the shares gathered; every rank's final weights saved for the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    groups = _groups()
    _grads(groups, rank)
    shards = Shards(groups, rank, world)
    shards.reduce_scatter()
    for k, group in enumerate(groups):
        assert all(p.grad is None for i, p in enumerate(group) if i not in shards.index[rank][k])
        clip(group, 0.5, global_norm(group, shards.index[rank][k]))
        torch.optim.SGD(shards.owned(k), lr=0.1).step()  # (SGD: its step scales with the clipped gradient, AdamW's hardly)
    shards.share_weights()
    torch.save([[p.detach() for p in group] for group in groups], f"{out}/rank{rank}.pt")
    # A broadcast's root may return before its receivers finish; tearing its connections down then
    # aborts a receiver in gloo's transport ("terminate called without an active exception", seen once).
    dist.barrier()
    dist.destroy_process_group()


def test_three_ranks_step_as_one_optimizer_over_the_summed_gradients(tmp_path):
    """Uneven shares, a tensor no rank has a gradient for, clipping active: every rank ends with the
    weights one SGD step over the summed, clipped gradients gives (to float32 rounding: three
    ranks sum in gloo's order), and all ranks the same weights bit for bit."""
    import torch.multiprocessing as mp

    world = 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    mp.spawn(_sharded_step, args=(world, address, str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    expected = _groups()
    summed = [[None if (k, i) == NO_GRAD else torch.zeros(p.shape) for i, p in enumerate(group)] for k, group in enumerate(expected)]
    for r in range(world):
        _grads(expected, r)
        for k, group in enumerate(expected):
            for i, p in enumerate(group):
                if p.grad is not None:
                    summed[k][i] += p.grad
    initial = _groups()
    for k, group in enumerate(expected):
        for p, g in zip(group, summed[k]):
            p.grad = g
        assert torch.nn.utils.clip_grad_norm_(group, 0.5) > 0.5  # the clip scales the step
        torch.optim.SGD(group, lr=0.1).step()
        for r in range(world):
            assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(ranks[r][k], group)), (r, k)
            assert all(torch.equal(a, b) for a, b in zip(ranks[r][k], ranks[0][k]))
    assert torch.equal(ranks[0][NO_GRAD[0]][NO_GRAD[1]], initial[NO_GRAD[0]][NO_GRAD[1]])  # no gradient anywhere: not stepped
