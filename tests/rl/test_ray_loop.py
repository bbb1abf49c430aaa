"""The RL loop with its generation instances on Ray actors (a local cluster the tests start):
the same rollouts and metrics as in-process, new weights in every actor before each rollout,
no sample lost when an actor dies mid-rollout, and an exact resume with the actors' drafter state."""

import pytest

from rlhfspec import RlhfspecError
from rlhfspec.rl.trainer import Trainer
from tests.conftest import local_ray
from tests.rl.test_distributed import COMPARED, STATISTICS
from tests.rl.test_trainer import DETERMINISTIC, config

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    yield from local_ray(4)


def recorded(trainer):
    """The token ids of every rollout the trainer makes, iteration by iteration."""
    seen = []
    run = trainer.rollout.run

    def recording(*args, **kwargs):
        out = run(*args, **kwargs)
        seen.append([o.token_ids for o in out.outputs])
        return out

    trainer.rollout.run = recording
    return seen


ON_RAY = {"generation.backend": "ray", "generation.instances": 2, "generation.realloc": "true", "run.threads": 2}


def test_ray_actors_generate_what_the_in_process_run_generates_after_every_update(cluster, tmp_path, policy):
    """Iteration 2 samples from the updated policy: equal rollouts there mean the actors got the new weights."""
    local = Trainer(config(tmp_path / "local", policy, **{"train.iterations": 3}), progress=False, log=lambda m: None)
    local_rollouts = recorded(local)
    local_records = local.train()
    remote = Trainer(config(tmp_path / "ray", policy, **{"train.iterations": 3, **ON_RAY}), progress=False, log=lambda m: None)
    remote_rollouts = recorded(remote)
    remote_records = remote.train()
    assert remote_rollouts == local_rollouts
    for a, b in zip(local_records, remote_records):
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}
    assert all(r["weight_sync_s"] > 0 and r["weight_sync_mb"] > 0 for r in remote_records)
    assert remote.rollout.backend is None  # train() stopped the actors


def test_an_actor_killed_mid_rollout_inside_the_loop_loses_no_sample(cluster, tmp_path, policy):
    local = Trainer(config(tmp_path / "local", policy, **{"train.iterations": 2, "generation.max_new_tokens": 16}),
                    progress=False, log=lambda m: None)
    local_rollouts = recorded(local)
    local.train()
    remote = Trainer(config(tmp_path / "ray", policy, **{"train.iterations": 2, "generation.max_new_tokens": 16, **ON_RAY}),
                     progress=False, log=lambda m: None)
    remote_rollouts = recorded(remote)
    backend = remote.rollout.backend
    original, rounds = backend.run_round, {"n": 0}

    def killing(steps):
        if len(remote_rollouts) == 1:  # iteration 1, after an update: the replacement must get the new weights
            rounds["n"] += 1
            if rounds["n"] == 2:
                ray.kill(backend.actors[1], no_restart=True)
        yield from original(steps)

    backend.run_round = killing
    remote.train()
    assert rounds["n"] > 2
    assert remote_rollouts == local_rollouts  # every sample once, each with the same tokens


def test_a_ray_run_resumes_exactly_with_its_actors_drafter_state(cluster, tmp_path, policy):
    """n-gram histories live in the actors; the checkpoint gathers them and a resumed run gives them back."""
    extra = {"generation.speculative": "true", "generation.strategy": "static", "generation.num_draft_tokens": 3, **ON_RAY}
    whole = Trainer(config(tmp_path / "whole", policy, **extra), progress=False, log=lambda m: None).train()
    cfg = config(tmp_path / "cut", policy, **{**extra, "train.iterations": 1})
    Trainer(cfg, progress=False, log=lambda m: None).train()
    resumed = Trainer(config(tmp_path / "cut", policy, **extra), resume=True, progress=False, log=lambda m: None).train()
    for a, b in zip(whole[1:], resumed):
        assert {k: a[k] for k in (*DETERMINISTIC, "acceptance")} == {k: b[k] for k in (*DETERMINISTIC, "acceptance")}
    assert all(r["acceptance"] is not None for r in whole)


def test_ray_actors_and_two_training_workers_give_the_in_process_run(cluster, tmp_path, policy):
    """K = 2 generation actors and N = 2 data-parallel trainers: iteration 0's rollouts are the same
    samples; after that the weights differ from the in-process run's by the data-parallel sums'
    last bits (float32: below 1e-6, see test_distributed), which leaves the sampled tokens and the
    metrics as they were unless a draw falls on a near-tie."""
    fp32 = {"train.dtype": "float32", "train.iterations": 2}
    local = Trainer(config(tmp_path / "local", policy, **fp32), progress=False, log=lambda m: None)
    local_rollouts = recorded(local)
    local_records = local.train()
    remote = Trainer(config(tmp_path / "ray", policy, **{**fp32, **ON_RAY, "run.threads": 2, "train.workers": 2}),
                     progress=False, log=lambda m: None)
    remote_rollouts = recorded(remote)
    remote_records = remote.train()
    assert remote_rollouts[0] == local_rollouts[0]
    for a, b in zip(local_records, remote_records):
        assert {k: b[k] for k in COMPARED} == pytest.approx({k: a[k] for k in COMPARED}, **STATISTICS)


def test_more_generation_actors_than_free_cpus_is_one_sentence(cluster, tmp_path, policy):
    with pytest.raises(RlhfspecError, match=r"^8 generation actors of 1 threads need 8 CPUs, but the Ray cluster has 4 free\.$"):
        Trainer(config(tmp_path, policy, **{**ON_RAY, "generation.instances": 8, "run.threads": 8}), progress=False)


def test_generation_actors_asking_for_gpus_the_cluster_lacks_is_one_sentence(cluster, tmp_path, policy):
    """Actors that reserve GPUs on a cluster without them would wait forever: refused, naming the shortfall."""
    with pytest.raises(RlhfspecError, match=r"^2 generation actors of 0\.5 GPU each need 1 GPUs, but the Ray cluster has 0 free "):
        Trainer(config(tmp_path, policy, **{**ON_RAY, "generation.gpus_per_instance": 0.5}), progress=False)
