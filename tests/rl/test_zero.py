"""The sharded optimizer's bookkeeping (rlhfspec/rl/zero.py) without a process group: how the
parameters are dealt to the ranks, and the ranks' optimizer states renumbered, merged and split
again. The collectives themselves run in tests/rl/test_distributed.py against the replicated state."""

import pytest
import torch

from rlhfspec import RlhfspecError
from rlhfspec.rl.zero import global_state, local_state, merge_states, partition


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
        own.load_state_dict(local_state(full, index))
        assert [s["step"] for s in own.state.values()] == [full["state"][i]["step"] for i in index]
        assert all(torch.equal(own.state[params[i]]["exp_avg"], full["state"][i]["exp_avg"]) for i in index)
        parts.append(global_state(own.state_dict(), index))
    merged = merge_states(parts[::-1])  # in any order
    assert merged["param_groups"] == full["param_groups"]
    assert list(merged["state"]) == list(full["state"])
    assert all(torch.equal(merged["state"][i][k], full["state"][i][k]) for i in full["state"] for k in full["state"][i])
