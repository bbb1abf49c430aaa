"""Data-parallel training on a local Ray cluster these tests start: two workers step as the
in-process learner does (up to the order of the gradient sums), a seeded run with train.workers 2
gives the in-process run's numbers, and a worker killed mid-run stops the run with one sentence
and --resume continues it from the last checkpoint as if nothing had happened."""

from pathlib import Path

import pytest
import torch

from rlhfspec import RlhfspecError
from rlhfspec.models.loader import load_model
from rlhfspec.rl import checkpoint as ckpt
from rlhfspec.rl.learner import Learner, load_critic, score_params
from rlhfspec.rl.logprobs import Batch, all_logprobs
from rlhfspec.rl.metrics import read
from rlhfspec.rl.objective import Targets
from rlhfspec.rl.trainer import Trainer
from tests.conftest import local_ray
from tests.rl.helpers import rl_config, tiny_policy_dir

ray = pytest.importorskip("ray")

# In float32 the ranks' gradients add up in another order than one process accumulates its
# micro-batches: the weights after 6 AdamW steps at lr 1e-3 differ by at most 2.4e-7 (GRPO) and
# 8.1e-7 (PPO), measured, against steps of 5e-3. (Under bfloat16 autocast each rank's micro-batches,
# of other shapes, round otherwise: 1e-3 relative, so these tests train in float32.) The seeded
# 3-iteration run's rewards come out equal, its losses within 1.2e-7, its final weights within 2.7e-7
# (6.1e-7 before the sharded optimizer's clipping norm, now also the replicated one's). On another
# CPU's kernel paths (the libraries held to AVX2) the PPO weights differed by 1.1e-5, at an element
# that moved 4.2e-3: rounding can move a token across the clip boundary and AdamW's steps carry it
# on, so no bound this small holds by construction. The bound is a tenth of one step (lr 1e-3); a
# real fault (a micro-batch lost or counted twice, a wrong normalisation) moves weights by the order
# of a step, and the statistics below are compared to 1e-5 relative.
PARAMETERS = 1e-4
STATISTICS = dict(rel=1e-5, abs=1e-6)
COMPARED = ("reward", "reward_std", "loss", "grad_norm", "clip_frac", "entropy", "completion_len", "lr")


@pytest.fixture(scope="module")
def cluster():
    yield from local_ray(4)  # (logical CPUs: two 2-worker groups side by side)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_policy_dir(tmp_path_factory.mktemp("distributed") / "policy")


def _config(tmp_path, policy, **overrides):
    c = rl_config(tmp_path, policy, **{"generation.num_generations": 4, "generation.max_new_tokens": 8, "train.iterations": 2,
                                       "reward.functions": "[tests.rl.rewards:digit_count]", "train.learning_rate": 1e-3,
                                       "run.threads": 1, "train.dtype": "float32", **overrides})
    c.validate()
    return c


def _experience(c, policy_model, n: int = 7) -> tuple[Batch, Targets]:
    """n samples of ragged lengths with random advantages; old logprobs are the policy's own."""
    g = torch.Generator().manual_seed(5)
    vocab = policy_model.config.vocab_size - 4
    lengths = torch.randint(2, 9, (n, 2), generator=g).tolist()
    batch = Batch([torch.randint(4, vocab, (p,), generator=g).tolist() for p, _ in lengths],
                  [torch.randint(4, vocab, (t,), generator=g).tolist() for _, t in lengths])
    mask = batch.mask()
    old = all_logprobs(policy_model, batch, score_params(c), 1 << 20)
    if c.algorithm.name == "ppo":
        shape = mask.shape
        return batch, Targets(mask, old, torch.randn(shape, generator=g) * mask, returns=torch.randn(shape, generator=g) * mask,
                              old_values=torch.zeros(shape))
    return batch, Targets(mask, old, torch.randn(n, generator=g), ref_logprobs=old - 0.1 * torch.rand(mask.shape, generator=g) * mask)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_two_workers_step_as_one_process_does(cluster, tmp_path, policy, algo):
    """7 samples in 3 mini-batches (3, 2, 2 samples: the ranks' shares are unequal) over 2 epochs,
    micro-batched, with a KL term (GRPO) or a critic (PPO): the same statistics and weights."""
    from rlhfspec.rl.distributed import RayLearners

    extra = {"algorithm.beta": 0.05} if algo == "grpo" else {"algorithm.name": "ppo"}
    c = _config(tmp_path, policy, **{"train.mini_batches": 3, "train.epochs": 2, "train.micro_batch_tokens": 24, **extra})
    models = []
    for _ in range(2):
        model = load_model(c.model.policy, dtype=c.model.dtype, tokenizer=False)[0].train().requires_grad_(True)
        models.append((model, load_critic(c) if algo == "ppo" else None))
    batch, targets = _experience(c, models[0][0])
    one = Learner(c, *models[0]).optimize(batch, targets, 0)
    c.train.workers = 2
    learners = RayLearners(c, *models[1])
    try:
        two = learners.optimize(batch, targets, 0)
    finally:
        learners.close()
    timings = {k: two.pop(k) for k in ("allreduce_s", "allreduce_wait_s", "weights_back_s")}  # the transfer's own seconds
    assert all(t >= 0 for t in timings.values()) and timings["allreduce_s"] > 0
    assert two.pop("worker_peak_mb") > 0 and 0 < two.pop("optimizer_state_mb") < 0.6 * one.pop("optimizer_state_mb")  # sharded by default
    assert two.pop("train_tokens") > 0 and one.pop("train_tokens") > 0  # (not equal: each rank pads to its own rows)
    assert one.keys() == two.keys() and one == pytest.approx(two, **STATISTICS)
    assert one["grad_norm"] > 0 and one["clip_frac"] > 0  # real steps, off the trust region's centre
    diff = max((a - b).abs().max().item() for a, b in zip(models[0][0].parameters(), models[1][0].parameters()))
    moved = min((a - b).abs().max().item() for a, b in zip(models[0][0].parameters(), load_model(c.model.policy, tokenizer=False)[0].parameters()))
    assert diff < PARAMETERS < moved
    if algo == "ppo":
        critic = max((a - b).abs().max().item() for a, b in zip(models[0][1][0].parameters(), models[1][1][0].parameters()))
        assert critic < PARAMETERS and (models[0][1][1] - models[1][1][1]).abs().max() < PARAMETERS


def _states_equal(a, b) -> bool:
    """Whether two (nested) optimizer states are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    return a == b


def _learners(tmp_path, policy, algo: str, sharded: bool):
    """RayLearners of 2 workers (fresh weights and optimizer state) for the sharded-state tests."""
    from rlhfspec.rl.distributed import RayLearners

    extra = {"algorithm.beta": 0.05} if algo == "grpo" else {"algorithm.name": "ppo"} if algo == "ppo" else {}
    c = _config(tmp_path, policy, **{"train.mini_batches": 7 if algo == "skip" else 3, "train.epochs": 2, "train.micro_batch_tokens": 24,
                                     "train.workers": 2, "train.shard_optimizer": sharded, "train.max_grad_norm": 0.05, **extra})
    model = load_model(c.model.policy, tokenizer=False)[0].train().requires_grad_(True)
    critic = load_critic(c) if algo == "ppo" else None
    return c, RayLearners(c, model, critic), [*model.parameters(), *([*critic[0].parameters(), critic[1]] if critic else [])]


@pytest.mark.parametrize("algo", ["grpo", "ppo", "skip"])
def test_the_sharded_optimizer_steps_as_the_replicated_one_bit_for_bit(cluster, tmp_path, policy, algo):
    """Two workers keeping half of the AdamW state each (ZeRO-1) against two keeping all of it:
    the same statistics, weights and (merged) optimizer state after 6 steps (GRPO with a KL term;
    PPO with its critic; "skip": one sample per mini-batch, some with no advantage, so some steps
    skip every sample and step on zero gradients). Then fresh workers of each layout load the
    other's state and step on: the same weights again. train.max_grad_norm is small, so every step
    is clipped by the norm taken over both ranks. Two ranks sum a + b whichever way round, so no
    tolerance is needed."""
    c, replicated, params_r = _learners(tmp_path, policy, algo, sharded=False)
    _, sharded, params_s = _learners(tmp_path, policy, algo, sharded=True)
    batch, targets = _experience(c, load_model(c.model.policy, tokenizer=False)[0])
    if algo == "skip":
        targets.advantages[[1, 4, 5]] = 0.0
    try:
        stats = {k: learners.optimize(batch, targets, 0) for k, learners in (("r", replicated), ("s", sharded))}
        for s in stats.values():
            for k in ("allreduce_s", "allreduce_wait_s", "weights_back_s", "worker_peak_mb"):
                s.pop(k)
        memory = {k: s.pop("optimizer_state_mb") for k, s in stats.items()}
        assert stats["r"] == stats["s"] and stats["s"]["grad_norm"] > 0.05  # the clip scales the steps
        assert stats["s"]["skipped_samples"] == (3 if algo == "skip" else 0)  # (counted over the first epoch)
        assert 0.4 < memory["s"] / memory["r"] < 0.6  # each rank keeps about half of the moments
        assert all(torch.equal(a, b) for a, b in zip(params_r, params_s))
        states = {"r": replicated.state_dict(), "s": sharded.state_dict()}
        assert _states_equal(states["r"], states["s"])
        assert len(states["s"][1]["optimizer"]["state"]) == len(list(replicated.policy.parameters()))
        after = {}
        for k, learners in (("r", replicated), ("s", sharded)):  # each layout, fresh, goes on from the other's state
            learners.close()
            _, fresh, params = _learners(tmp_path, policy, algo, sharded=k == "r")
            try:
                fresh.load_state_dict(*states[k])
                fresh.optimize(batch, targets, 1)
                after[k] = [p.detach().clone() for p in params]
            finally:
                fresh.close()
        assert all(torch.equal(a, b) for a, b in zip(after["r"], after["s"]))
        assert not all(torch.equal(a, b) for a, b in zip(after["r"], params_r))  # the second iteration moved them
    finally:
        replicated.close()
        sharded.close()


def test_more_workers_than_the_cluster_has_cpus_is_refused_before_any_starts(cluster, tmp_path, policy):
    from rlhfspec.rl.distributed import RayLearners

    c = _config(tmp_path, policy, **{"train.workers": 5})
    model = load_model(c.model.policy, tokenizer=False)[0]
    with pytest.raises(RlhfspecError, match=r"^train.workers is 5 but the Ray cluster has 4 free CPUs; each training worker takes one\.$"):
        RayLearners(c, model)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory, policy):
    """The same seeded 3-iteration run in this process and with train.workers 2."""
    out = {}
    for name, workers in (("inproc", 1), ("workers", 2)):
        c = _config(tmp_path_factory.mktemp(name), policy, **{"train.workers": workers, "train.iterations": 3, "train.mini_batches": 2,
                                                              "train.shard_optimizer": True})
        out[name] = (c, Trainer(c, progress=False, log=lambda m: None).train())
    return out


def test_a_seeded_run_with_two_workers_gives_the_in_process_numbers(runs):
    (_, one), (c, two) = runs["inproc"], runs["workers"]
    assert [r["iteration"] for r in two] == [0, 1, 2] and any(r["grad_norm"] > 0 for r in one)
    for a, b in zip(one, two):
        assert {k: b[k] for k in COMPARED} == pytest.approx({k: a[k] for k in COMPARED}, **STATISTICS), a["iteration"]
    w1 = ckpt.load(ckpt.latest(Path(runs["inproc"][0].run.output_dir)))[0]["policy"]
    w2 = ckpt.load(ckpt.latest(Path(c.run.output_dir)))[0]["policy"]
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < PARAMETERS


def test_a_worker_killed_mid_run_stops_it_and_resume_continues_exactly(runs, tmp_path, policy):
    c = _config(tmp_path, policy, **{"train.workers": 2, "train.iterations": 3, "train.mini_batches": 2, "train.shard_optimizer": True})
    trainer = Trainer(c, progress=False, log=lambda m: None)
    optimize = trainer.learner.optimize

    def killing(batch, targets, iteration):
        if iteration == 1:
            ray.kill(trainer.learner.workers[1], no_restart=True)
        return optimize(batch, targets, iteration)

    trainer.learner.optimize = killing
    with pytest.raises(RlhfspecError, match=r"^training worker 1 of 2 died at iteration 1; the iteration was not committed, "
                                            r"rerun with --resume to continue from the last checkpoint\.$"):
        trainer.train()
    assert ckpt.latest(tmp_path / "run").name == "iter-000001" and not trainer.learner.workers
    lines = []
    resumed = Trainer(c, resume=True, progress=False, log=lines.append)
    resumed.train()
    assert any(line.startswith("resumed from") and line.endswith("at iteration 1") for line in lines)
    whole = runs["workers"][1]
    records = read(tmp_path / "run")
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for a, b in zip(whole, records):  # the same workers, the same sums: bit for bit
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}, a["iteration"]
    w1 = ckpt.load(ckpt.latest(Path(runs["workers"][0].run.output_dir)))[0]["policy"]
    w2 = ckpt.load(ckpt.latest(tmp_path / "run"))[0]["policy"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
