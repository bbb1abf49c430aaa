"""`rlhfspec bench e2e --compare precision`, `sharding`, `prompts`, `skip`, `checkpointing` and `logits`: every
setting runs the same job and the table comes out."""

from __future__ import annotations

import json

import pytest

from rlhfspec.bench.e2e import PRECISIONS, SHARDINGS, _in_fresh_process, run
from rlhfspec.bench.e2e_settings import SHARING, TRAINER_SETTINGS
from rlhfspec.errors import RlhfspecError
from rlhfspec.rl.config_files import load_config
from rlhfspec.rl.trainer import Trainer
from tests.rl.helpers import tiny_policy_dir


def _overrides(tmp_path, reward: str = "digit_count") -> list[str]:
    policy = tiny_policy_dir(tmp_path / "policy")
    overrides = {"model.policy": policy, "data.prompts_per_iteration": 2, "generation.num_generations": 2,
                 "generation.max_new_tokens": 6, "generation.speculative": "false", "reward.functions": f"[tests.rl.rewards:{reward}]"}
    return [a for k, v in overrides.items() for a in (f"--{k}", str(v))]


def test_the_precision_comparison_runs_every_setting_and_writes_its_table(tmp_path):
    lines = []
    result = run(None, 2, _overrides(tmp_path), json_path=str(tmp_path / "e2e.json"), log=lines.append, compare="precision")
    assert list(result["stages"]) == list(PRECISIONS)
    assert result["relative_to_float32"]["float32"] == {"generation_s": 1.0, "training_s": 1.0, "iteration_s": 1.0}
    for label, runs in result["runs"].items():
        assert len(runs) == 2 and all(r["gen_tokens"] > 0 for r in runs), label
    # bfloat16 training: the float32 engine's logprobs are measured against the trainer's
    assert result["logprob_gap"]["bf16 train, float32 generation"]["max"] > 1e-3
    assert json.loads((tmp_path / "e2e.json").read_text())["stages"] == result["stages"]
    table = lines[-1]
    assert "<!-- bench" not in table and "| bf16 train + generation |" in table and "--compare precision" in table


def test_the_sharding_comparison_runs_the_same_iterations_on_half_the_optimizer_state(tmp_path):
    pytest.importorskip("ray")
    lines = []
    extra = ["--run.threads", "2", "--train.dtype", "float32"]  # (a local Ray cluster of 2 CPUs, started by each row)
    result = run(None, 2, [*_overrides(tmp_path), *extra], json_path=str(tmp_path / "e2e.json"), log=lines.append, compare="sharding")
    replicated, sharded = SHARDINGS
    assert list(result["stages"]) == [replicated, sharded] and result["same_runs"] is True
    assert all(len(runs) == 2 and all(r["gen_tokens"] > 0 for r in runs) for runs in result["runs"].values())
    state = {label: m["optimizer_state_mb"] for label, m in result["stages"].items()}
    assert 0 < state[sharded] < 0.6 * state[replicated]
    assert all(m["worker_peak_mb"] > 0 and m["allreduce_s"] >= 0 for m in result["stages"].values())  # (seconds rounded to 0.01)
    table = lines[-1]
    assert "<!-- bench" not in table and f"| {sharded} |" in table and "--compare sharding" in table


def _row(x: int, log) -> dict:
    import os

    log(f"row {x} in {os.getpid()}")
    if x < 0:
        raise RlhfspecError("x is negative.")
    if x == 0:
        os._exit(3)
    return {"x": x, "pid": os.getpid()}


def test_a_placement_row_runs_in_a_fresh_process_that_passes_on_its_log_result_and_failure():
    import os

    lines = []
    out = _in_fresh_process(_row, (2,), "two", lines.append)
    assert out["x"] == 2 and out["pid"] != os.getpid() and lines == [f"row 2 in {out['pid']}"]
    with pytest.raises(RlhfspecError, match=r"^x is negative\.$"):
        _in_fresh_process(_row, (-1,), "negative", lines.append)
    with pytest.raises(RlhfspecError, match="process for 'zero' ended \\(exit code 3\\) without a result"):
        _in_fresh_process(_row, (0,), "zero", lines.append)


def test_the_prompt_sharing_comparison_trains_the_same_samples_on_fewer_tokens(tmp_path):
    lines = []
    result = run(None, 2, _overrides(tmp_path), json_path=str(tmp_path / "e2e.json"), log=lines.append, compare="prompts")
    assert list(result["training"]) == list(SHARING)
    for x in result["runs"]:  # each iteration's samples trained both ways from one state: the same update to rounding
        plain, shared = (x[label] for label in SHARING)
        assert shared["train_tokens"] < plain["train_tokens"]  # 2 samples a prompt: each prompt computed once, not twice
        assert shared["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-6) and 0 < x["weight_diff_max"] < 1e-5
    assert result["relative_to_reference"]["a row per sample"]["training_s"] == 1.0
    table = lines[-1]
    assert "| prompts shared |" in table and "--compare prompts" in table
    # The run goes on from the second setting's update whichever order the settings ran in.
    c = load_config(None, [*_overrides(tmp_path), "--train.iterations", "2", "--run.output_dir", str(tmp_path / "plain")])
    plain = Trainer(c, progress=False, log=lambda m: None).train()
    assert [r["loss"] for r in plain] == [x["prompts shared"]["loss"] for x in result["runs"]]


def test_the_skip_comparison_trains_no_sample_of_a_group_that_scored_alike(tmp_path):
    """A reward that only reads the prompt: every group scores alike, so the skipping setting runs
    no training forward at all, and its update (on zero gradients) is the other's exactly."""
    lines = []
    result = run(None, 2, _overrides(tmp_path, "per_prompt"), json_path=str(tmp_path / "e2e.json"), log=lines.append, compare="skip")
    every, skipping = TRAINER_SETTINGS["skip"]["values"]
    for x in result["runs"]:
        assert x[every]["train_tokens"] > 0 and x[every]["skipped_samples"] == 0
        assert x[skipping]["train_tokens"] == 0 and x[skipping]["skipped_samples"] == 4
    assert result["weight_diff_max"] == 0
    table = lines[-1]
    assert "| zero-advantage skipped |" in table and "--compare skip" in table


@pytest.mark.parametrize("compare", ["checkpointing", "logits"])
def test_the_recomputing_comparisons_train_the_same_update(tmp_path, compare, monkeypatch):
    """Recomputing each layer, or the output layer's logits (in pieces of 3 rows here, so several),
    in the backward pass changes no gradient beyond rounding, so the two settings' updates agree;
    only the recomputing setting's steps go through torch's checkpoint; the table reports both
    settings' peak memory."""
    import rlhfspec.models.llama as llama
    import rlhfspec.rl.logprobs as logprobs
    from rlhfspec.rl.learner import Learner

    kept, recomputed = TRAINER_SETTINGS[compare]["values"]
    if compare == "logits":
        monkeypatch.setitem(TRAINER_SETTINGS[compare], "values", {kept: None, recomputed: 3})
    calls, steps = [0], []
    for module in (llama, logprobs):
        original = module.checkpoint
        monkeypatch.setattr(module, "checkpoint", lambda *a, original=original, **k: calls.__setitem__(0, calls[0] + 1) or original(*a, **k))
    optimize = Learner.optimize

    def counted(self, *args):
        before = calls[0]
        out = optimize(self, *args)
        steps.append((self.policy.checkpointing or bool(self.config.train.logits_chunk), calls[0] > before))
        return out

    monkeypatch.setattr(Learner, "optimize", counted)
    lines = []
    result = run(None, 2, _overrides(tmp_path), json_path=str(tmp_path / "e2e.json"), log=lines.append, compare=compare)
    assert sorted(steps) == [(False, False)] * 2 + [(True, True)] * 2  # each iteration trained both ways
    for x in result["runs"]:
        # The GRPO loss is about 1e-7 here (ratio 1, advantages of mean 0): compared to its rounding, not relatively.
        assert x[recomputed]["loss"] == pytest.approx(x[kept]["loss"], rel=1e-6, abs=1e-7) and x["weight_diff_max"] < 1e-6
        assert x[kept]["train_tokens"] == x[recomputed]["train_tokens"]
    table = lines[-1]
    assert f"| {recomputed} |" in table and f"--compare {compare}" in table and "peak memory MB" in table
