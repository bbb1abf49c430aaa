"""The RL loop end to end on a tiny model: GRPO, RLOO and PPO run; checkpoints, export, resume after
SIGKILL, and clear errors that leave nothing committed."""

import json
import math
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
from rlhfspec.rl.metrics import read
from rlhfspec.rl.trainer import Trainer
from tests.rl.helpers import rl_config

DETERMINISTIC = ("reward", "reward_std", "loss", "grad_norm", "clip_frac", "completion_len", "lr")


def config(tmp_path, policy, **overrides):
    return rl_config(tmp_path, policy, **{"generation.num_generations": 4, "generation.max_new_tokens": 8,
                                          "reward.functions": "[tests.rl.rewards:digit_count]", "train.iterations": 3,
                                          "train.learning_rate": 1e-3, **overrides})


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


@pytest.mark.parametrize("strategy", ["static", "threshold", "adaptive"])
def test_speculative_rollouts_inside_the_loop_train_exactly_as_plain_ones(tmp_path, policy, strategy):
    """n-gram drafts are verified with plain sampling's own uniforms, so speculation under any
    strategy changes no sampled token: the run equals the speculation-off run."""
    plain = Trainer(config(tmp_path / "plain", policy, **{"train.iterations": 2}), progress=False, log=lambda m: None).train()
    cfg = config(tmp_path / strategy, policy, **{"generation.speculative": "true", "generation.strategy": strategy,
                                                 "generation.num_draft_tokens": 3, "train.iterations": 2})
    spec = Trainer(cfg, progress=False, log=lambda m: None).train()
    for a, b in zip(plain, spec):
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}
    if strategy != "adaptive":  # the static and threshold (live batch 8 <= 32) strategies draft on every step
        assert all(r["acceptance"] is not None for r in spec) and max(r["acceptance"] for r in spec) > 0


def test_two_instances_with_reallocation_train_exactly_as_one(tmp_path, policy):
    """Placement independence inside the loop: the same samples, so the same metrics. (With
    speculation the drafts differ by instance, so only the distribution is the same.)"""
    runs = []
    for name, extra in (("one", {}), ("two", {"generation.instances": 2, "generation.realloc": "true"})):
        cfg = config(tmp_path / name, policy, **{"train.iterations": 2, **extra})
        runs.append(Trainer(cfg, progress=False, log=lambda m: None).train())
    for a, b in zip(*runs):
        assert {k: a[k] for k in DETERMINISTIC} == pytest.approx({k: b[k] for k in DETERMINISTIC}, rel=1e-4, abs=1e-6)
    spec = config(tmp_path / "spec", policy, **{"generation.speculative": "true", "generation.strategy": "static",
                                                "generation.instances": 2, "train.iterations": 1})
    assert Trainer(spec, progress=False, log=lambda m: None).train()[-1]["acceptance"] is not None
    with pytest.raises(RlhfspecError, match="generation.backend 'slurm' is not one of inproc, ray"):
        Trainer(config(tmp_path / "slurm", policy, **{"generation.backend": "slurm"}), progress=False)


def test_export_writes_a_checkpoint_transformers_loads(tmp_path, policy):
    from transformers import AutoModelForCausalLM

    Trainer(config(tmp_path, policy, **{"train.iterations": 1}), progress=False, log=lambda m: None).train()
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "rlhfspec.cli.main", "export", str(tmp_path / "run"), str(out)], check=True, capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tensors, _ = ckpt.load(ckpt.latest(tmp_path / "run"))
    assert torch.equal(model.model.embed_tokens.weight, tensors["policy"]["embed.weight"])
    # A directory that holds files (here the policy the run started from) is not written over unless asked.
    again = subprocess.run([sys.executable, "-m", "rlhfspec.cli.main", "export", str(tmp_path / "run"), str(policy)], capture_output=True, text=True)
    assert again.returncode == 2 and f"{policy} already exists and is not an empty directory" in again.stderr
    subprocess.run([sys.executable, "-m", "rlhfspec.cli.main", "export", str(tmp_path / "run"), str(out), "--overwrite"], check=True, capture_output=True)


def _chat_task(path: Path) -> Path:
    """A chat-messages JSONL task of the tiny vocabulary."""
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b} ? give the answer as just a number"}], "answer": str(a + b)}
            for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (7, 0), (4, 4), (8, 1)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("task", ["arithmetic", "chat-jsonl"])
def test_a_run_killed_after_a_checkpoint_resumes_bitwise_as_the_uninterrupted_run(tmp_path, policy, task):
    """SIGKILL (a real subprocess) after checkpoint 1 of a seeded run with real gradient updates;
    the resumed run's metrics and final weights equal the uninterrupted run's bit for bit (the
    engine is batch-invariant and training runs the same kernels in the same order)."""
    base = ["--model.policy", str(policy), "--data.prompts_per_iteration", "2", "--generation.num_generations", "4",
            "--generation.max_new_tokens", "24", "--reward.functions", "[tests.rl.rewards:digit_count]",
            "--train.iterations", "4", "--train.learning_rate", "1e-3", "--run.tensorboard", "false",
            "--generation.speculative", "true", "--generation.strategy", "static", "--generation.drafters", "[ngram]",
            "--run.threads", "2", "--no-progress"]
    if task == "chat-jsonl":
        base += ["--data.task", str(_chat_task(tmp_path / "task.jsonl"))]
    cmd = [sys.executable, "-m", "rlhfspec.cli.main", "train"]
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    subprocess.run(cmd + base + ["--run.output_dir", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd + base + ["--run.output_dir", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "iter-000002").exists():
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # during iteration 2 (0-based), after its predecessor's checkpoint
    proc.wait()
    assert not (run / "checkpoints" / "iter-000004").exists()
    done = subprocess.run(cmd + base + ["--run.output_dir", str(run), "--resume"], check=True, env=env, capture_output=True, text=True)
    assert "resumed from" in done.stdout and "at iteration 2" in done.stdout
    assert "over 4 iterations" in done.stdout  # the summary counts the whole run, not just the resumed part
    whole, resumed = read(tmp_path / "whole"), read(run)
    assert [r["iteration"] for r in resumed] == list(range(4))
    assert any(r["grad_norm"] > 0 for r in whole), "no gradient: the comparison would prove nothing"
    for a, b in zip(whole, resumed):
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}, a["iteration"]
    w = ckpt.load(ckpt.latest(tmp_path / "whole"))[0]["policy"]
    r = ckpt.load(ckpt.latest(run))[0]["policy"]
    assert all(torch.equal(w[k], r[k]) for k in w)


def test_a_kill_between_the_rename_and_the_pointer_resumes_from_the_renamed_checkpoint(tmp_path):
    """The CI failure of stop 30: killed after iter-000002 was renamed into place but before the
    `latest` pointer moved; the newest whole checkpoint is the directory, not the pointer."""
    state = {"policy": {"w": torch.arange(3.0)}}
    ckpt.save(tmp_path, 1, state, {"iteration": 1})
    ckpt.save(tmp_path, 2, state, {"iteration": 2})
    (tmp_path / "checkpoints" / ckpt.LATEST).write_text("iter-000001")  # the pointer a kill leaves behind
    assert ckpt.latest(tmp_path).name == "iter-000002"
    assert ckpt.load(ckpt.latest(tmp_path))[1] == {"iteration": 2}
    (tmp_path / "checkpoints" / ".iter-000003.tmpxyz").mkdir()  # a temporary of a kill while writing
    assert ckpt.latest(tmp_path).name == "iter-000002"


def test_a_checkpoint_holding_a_pickle_is_refused(tmp_path, policy):
    Trainer(config(tmp_path, policy, **{"train.iterations": 1}), progress=False, log=lambda m: None).train()
    path = ckpt.latest(tmp_path / "run")
    assert not list(path.glob("*.pkl")) and (path / "state.json").is_file()
    (path / "state.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(RlhfspecError, match="never unpickles"):
        ckpt.load(path)
    with pytest.raises(RlhfspecError, match="never unpickles"):
        Trainer(config(tmp_path, policy, **{"train.iterations": 2}), resume=True, progress=False, log=lambda m: None)


def test_checkpoint_state_round_trips_through_json_and_safetensors():
    objects = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
                             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0]}]},
               "rng": ckpt.rng_state(), "none": None, "nested": [[1, 2], {"a": (1, "x")}]}
    tensors: dict = {}
    back = ckpt.from_json(json.loads(json.dumps(ckpt.to_json(objects, tensors))), tensors)
    assert back["optimizer"]["param_groups"] == objects["optimizer"]["param_groups"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], objects["optimizer"]["state"][0]["exp_avg"])
    assert back["nested"] == objects["nested"] and back["none"] is None
    assert torch.equal(back["rng"]["torch"], objects["rng"]["torch"]) and back["rng"]["python"] == objects["rng"]["python"]
    with pytest.raises(RlhfspecError, match="no safe"):
        ckpt.to_json({"f": object()}, {})


def test_a_reward_function_that_raises_names_itself_and_commits_nothing(tmp_path, policy):
    trainer = Trainer(config(tmp_path, policy, **{"reward.functions": "[tests.rl.rewards:explode]"}), progress=False, log=lambda m: None)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    with pytest.raises(RlhfspecError, match=r"reward function explode raised ValueError: cannot score this on sample 0"):
        trainer.train()
    assert ckpt.latest(tmp_path / "run") is None
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())


def test_a_nan_loss_stops_the_run_without_committing(tmp_path, policy, monkeypatch):
    import rlhfspec.rl.learner as learner_module

    original = learner_module.policy_objective
    monkeypatch.setattr(learner_module, "policy_objective", lambda *a, **k: (original(*a, **k)[0] * float("nan"), original(*a, **k)[1]))
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


def test_filtered_sampling_with_a_kl_term_trains_on_the_temperature_only_distribution(tmp_path, policy):
    """top-p 0.8 and beta > 0: the reference may exclude a sampled token from its own filtered
    set, so the trainer scores under the temperature alone (as TRL and verl do) and nothing
    non-finite reaches the loss."""
    cfg = config(tmp_path, policy, **{"generation.top_p": 0.8, "algorithm.beta": 0.1, "train.iterations": 2})
    records = Trainer(cfg, progress=False, log=lambda m: None).train()
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in records)
    assert all("rollout_trainer_logprob_diff" in r for r in records)  # old logprobs recomputed, not the filtered engine's


def test_the_schedule_counts_the_steps_taken_and_logs_the_rate_each_used(tmp_path, policy):
    # 5 prompts x 2 samples = 10 per iteration in 6 mini-batches: 6 steps of 2, 2, 2, 2, 1, 1 samples.
    cfg = config(tmp_path, policy, **{"data.prompts_per_iteration": 5, "generation.num_generations": 2, "train.mini_batches": 6,
                                      "train.lr_schedule": "linear", "train.iterations": 2})
    trainer = Trainer(cfg, progress=False, log=lambda m: None)
    records = trainer.train()
    total = 2 * 6
    assert trainer.learner.scheduler.last_epoch == total
    assert records[0]["lr"] == pytest.approx(1e-3 * (1 - 5 / total)) and records[1]["lr"] == pytest.approx(1e-3 * (1 - 11 / total))


def test_entropy_is_logged_and_plotted_and_its_bonus_enters_the_loss(tmp_path, policy):
    from rlhfspec.rl.plots import plot_run

    runs = {}
    for coef in (0.0, 0.5):
        cfg = config(tmp_path / str(coef), policy, **{"algorithm.entropy_coef": coef, "train.iterations": 1})
        runs[coef] = Trainer(cfg, progress=False, log=lambda m: None).train()[0]
    assert runs[0.0]["entropy"] > 0 and runs[0.0]["entropy"] == pytest.approx(runs[0.5]["entropy"])
    # Same samples, so the loss moves by exactly -coef x the mean entropy (token-mean aggregation, one mini-batch).
    assert runs[0.5]["loss"] == pytest.approx(runs[0.0]["loss"] - 0.5 * runs[0.0]["entropy"], rel=1e-4, abs=1e-6)
    assert "entropy.png" in {p.name for p in plot_run(tmp_path / "0.0" / "run")}


def test_ppo_critic_uses_the_configured_weight_decay_and_logprobs_are_rechecked(tmp_path, policy):
    cfg = config(tmp_path, policy, **{"algorithm.name": "ppo", "train.weight_decay": 0.03, "train.iterations": 2,
                                      "train.logprob_check_every": 1})
    trainer = Trainer(cfg, progress=False, log=lambda m: None)
    assert trainer.learner.critic_opt.param_groups[0]["weight_decay"] == 0.03
    records = trainer.train()
    assert all("rollout_trainer_logprob_gap_max" in r for r in records)
