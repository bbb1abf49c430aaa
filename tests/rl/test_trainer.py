"""The RL loop end to end on a tiny model: GRPO, RLOO and PPO run; checkpoints, export, resume after
SIGKILL, and clear errors that leave nothing committed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhfspec import RlhfspecError
from rlhfspec.rl import checkpoint as ckpt
from rlhfspec.rl.config import load_config
from rlhfspec.rl.metrics import read
from rlhfspec.rl.trainer import Trainer
from tests.rl.helpers import tiny_policy_dir

DETERMINISTIC = ("reward", "reward_std", "loss", "grad_norm", "clip_frac", "completion_len", "lr")


def config(tmp_path, policy, **overrides):
    args = [
        "--model.policy", str(policy), "--run.output_dir", str(tmp_path / "run"),
        "--data.prompts_per_iteration", "2", "--generation.num_generations", "4", "--generation.max_new_tokens", "8",
        "--reward.functions", "[tests.rl.rewards:digit_count]", "--train.iterations", "3", "--train.learning_rate", "1e-3",
        "--run.tensorboard", "false", "--generation.spec", "false",
    ]
    for k, v in overrides.items():
        args += [f"--{k}", str(v)]
    return load_config(None, args)


@pytest.fixture
def policy(tmp_path):
    return tiny_policy_dir(tmp_path / "policy")


@pytest.mark.parametrize("algo", ["grpo", "rloo", "ppo"])
def test_each_algorithm_runs_and_changes_the_policy(tmp_path, policy, algo):
    extra = {"algorithm.name": algo, "train.iterations": 2}
    if algo == "grpo":
        extra["algorithm.beta"] = 0.05  # exercise the reference model and the KL term
    trainer = Trainer(config(tmp_path, policy, **extra), progress=False, log=lambda m: None)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    records = trainer.train()
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    assert len(read(tmp_path / "run")) == 2
    if algo == "grpo":
        assert "kl" in records[0]


def test_speculative_rollouts_run_inside_the_loop(tmp_path, policy):
    cfg = config(tmp_path, policy, **{"generation.spec": "true", "generation.strategy": "static", "generation.num_draft_tokens": 3})
    records = Trainer(cfg, progress=False, log=lambda m: None).train()
    assert records[-1]["acceptance"] is not None


def test_two_instances_with_reallocation_train_exactly_as_one(tmp_path, policy):
    """Placement independence inside the loop: the same samples, so the same metrics. (With
    speculation the drafts differ by instance, so only the distribution is the same.)"""
    runs = []
    for name, extra in (("one", {}), ("two", {"generation.instances": 2, "generation.realloc": "true"})):
        cfg = config(tmp_path / name, policy, **{"train.iterations": 2, **extra})
        runs.append(Trainer(cfg, progress=False, log=lambda m: None).train())
    for a, b in zip(*runs):
        assert {k: a[k] for k in DETERMINISTIC} == pytest.approx({k: b[k] for k in DETERMINISTIC}, rel=1e-4, abs=1e-6)
    spec = config(tmp_path / "spec", policy, **{"generation.spec": "true", "generation.strategy": "static",
                                                "generation.instances": 2, "train.iterations": 1})
    assert Trainer(spec, progress=False, log=lambda m: None).train()[-1]["acceptance"] is not None
    with pytest.raises(RlhfspecError, match="in-process"):
        Trainer(config(tmp_path / "ray", policy, **{"generation.instances": 2, "generation.backend": "ray"}), progress=False)


def test_export_writes_a_checkpoint_transformers_loads(tmp_path, policy):
    from transformers import AutoModelForCausalLM

    Trainer(config(tmp_path, policy, **{"train.iterations": 1}), progress=False, log=lambda m: None).train()
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "rlhfspec.cli.main", "export", str(tmp_path / "run"), str(out)], check=True, capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tensors, _ = ckpt.load(ckpt.latest(tmp_path / "run"))
    assert torch.equal(model.model.embed_tokens.weight, tensors["policy"]["embed.weight"])


def test_a_run_killed_mid_iteration_resumes_to_the_same_metrics(tmp_path, policy):
    base = ["--model.policy", str(policy), "--data.prompts_per_iteration", "4", "--generation.num_generations", "8",
            "--generation.max_new_tokens", "48", "--reward.functions", "[tests.rl.rewards:digit_count]",
            "--train.iterations", "6", "--train.learning_rate", "1e-3", "--run.tensorboard", "false",
            "--generation.spec", "true", "--generation.strategy", "static", "--generation.drafters", "[ngram]", "--no-progress"]
    cmd = [sys.executable, "-m", "rlhfspec.cli.main", "train"]
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    subprocess.run(cmd + base + ["--run.output_dir", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd + base + ["--run.output_dir", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "iter-000002").exists():
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # during iteration 2 (0-based), after its predecessor's checkpoint
    proc.wait()
    assert not (run / "checkpoints" / "iter-000006").exists()
    done = subprocess.run(cmd + base + ["--run.output_dir", str(run), "--resume"], check=True, env=env, capture_output=True, text=True)
    assert "resumed from" in done.stdout and "at iteration 2" in done.stdout
    whole, resumed = read(tmp_path / "whole"), read(run)
    assert [r["iteration"] for r in resumed] == list(range(6))
    for a, b in zip(whole, resumed):
        for key in DETERMINISTIC:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["iteration"], key)


def test_a_reward_function_that_raises_names_itself_and_commits_nothing(tmp_path, policy):
    trainer = Trainer(config(tmp_path, policy, **{"reward.functions": "[tests.rl.rewards:explode]"}), progress=False, log=lambda m: None)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    with pytest.raises(RlhfspecError, match=r"reward function explode raised ValueError: cannot score this on sample 0"):
        trainer.train()
    assert ckpt.latest(tmp_path / "run") is None
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())


def test_a_nan_loss_stops_the_run_without_committing(tmp_path, policy, monkeypatch):
    import rlhfspec.rl.trainer as trainer_module

    original = trainer_module.policy_objective
    monkeypatch.setattr(trainer_module, "policy_objective", lambda *a, **k: (original(*a, **k)[0] * float("nan"), original(*a, **k)[1]))
    trainer = Trainer(config(tmp_path, policy), progress=False, log=lambda m: None)
    with pytest.raises(RlhfspecError, match="policy loss became nan at iteration 0"):
        trainer.train()
    assert ckpt.latest(tmp_path / "run") is None


def test_an_existing_run_needs_resume(tmp_path, policy):
    Trainer(config(tmp_path, policy, **{"train.iterations": 1}), progress=False, log=lambda m: None).train()
    with pytest.raises(RlhfspecError, match="--resume"):
        Trainer(config(tmp_path, policy), progress=False, log=lambda m: None)


def test_plot_writes_a_runs_pngs_and_compares_runs(tmp_path, policy):
    from rlhfspec.cli.main import main

    Trainer(config(tmp_path, policy, **{"train.iterations": 2}), progress=False, log=lambda m: None).train()
    run = tmp_path / "run"
    assert main(["plot", str(run)]) == 0
    assert {"reward.png", "stage_times.png"} <= {p.name for p in (run / "plots").iterdir()}
    assert main(["plot", str(run), str(run), "--compare", str(tmp_path / "seeds.png")]) == 0
    assert (tmp_path / "seeds.png").stat().st_size > 0
    assert main(["plot", str(tmp_path), "--compare", str(tmp_path / "x.png")]) == 2  # no metrics there: a clear error
