"""`rlhfspec bench trl`: both trainers run the same job on the same prompts and the report comes out."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="bench trl compares against TRL: pip install -e '.[peers]' (make test installs it)")

from rlhfspec.bench import trl_grpo  # noqa: E402
from rlhfspec.bench.peers import PeersBenchConfig, _Rlhfspec, default_micro_batch, run, turn_order  # noqa: E402
from rlhfspec.bench.same_update import update_gap  # noqa: E402
from rlhfspec.errors import RlhfspecError  # noqa: E402
from rlhfspec.rl.config_files import load_config  # noqa: E402
from rlhfspec.rl.trainer import prompt_source  # noqa: E402
from tests.rl.helpers import tiny_policy_dir  # noqa: E402

DEFAULT_RUN = Path(__file__).parents[2] / "configs" / "grpo_arith.yaml"


def tiny(policy: Path, overrides_extra: tuple = (), **kw) -> PeersBenchConfig:
    overrides = {"model.policy": policy, "data.prompts_per_iteration": 2, "generation.num_generations": 2,
                 "generation.max_new_tokens": 6, "generation.speculative": "false", "train.dtype": "float32"}
    return PeersBenchConfig(**{"iterations": 2, **kw}, overrides=[*(a for k, v in overrides.items() for a in (f"--{k}", str(v))), *overrides_extra])


def test_both_trainers_run_the_same_prompts_and_the_table_json_and_png_come_out(tmp_path):
    policy = tiny_policy_dir(tmp_path / "policy")
    result = run(tiny(policy, replay_iterations=2), json_path=str(tmp_path / "trl.json"), out_dir=tmp_path / "out", log=lambda m: None)
    assert result["checks"] == {"same_prompts_in_order": True, "same_prompt_ids": True}
    for side in ("rlhfspec", "trl"):
        records = result["runs"][side]
        assert [r["iteration"] for r in records] == [0, 1]
        for r in records:
            assert r["gen_tokens"] > 0 and r["generation_s"] > 0 and r["training_s"] > 0
            assert r["iteration_s"] >= r["generation_s"] + r["scoring_s"] - 1e-6
    trl = result["trl"]
    assert (trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"], trl["generation_batch_size"]) == (4, 4)
    assert trl["loss_type"] == "dapo" and trl["bf16"] is False and trl["gradient_checkpointing"] is False
    saved = json.loads((tmp_path / "trl.json").read_text())
    assert saved["runs"] == result["runs"] and saved["differences"] == result["differences"]
    assert Path(result["png"]).stat().st_size > 0
    table = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "<!-- bench:trl -->" in table and "| TRL | 1 |" in table and "| rlhfspec | 1 |" in table
    assert "Differences the bench does not remove" in table and 'loss_type "dapo"' in table
    same = result["same_update"]  # TRL's step on rlhfspec's first samples (checked in depth below)
    assert same["samples"] == 4 and same["gradient_rel_diff"] < 1e-5 and "the same update from the same samples" in table
    assert len(same["replayed_steps"]) == 2 and same["last_update_rel_diff"] < 1e-3 and "first 2 iterations' samples" in table
    assert result["order"] == ["rlhfspec", "trl", "trl", "rlhfspec"] and "interleaved, each pair in ABBA order" in table


def test_trls_step_on_rlhfspecs_samples_is_rlhfspecs_update_and_a_changed_loss_shows(tmp_path):
    """The two trainers' semantics, not only their settings: TRL's optimizer step on the samples
    rlhfspec's first step trained on (replayed in place of TRL's own sampling) gives rlhfspec's loss,
    gradient norm, clipped gradients and weight update to float32 rounding; the same replay with
    another loss aggregation (a real semantic difference) lands far apart."""
    policy = tiny_policy_dir(tmp_path / "policy", seed=1)  # one whose samples end at several lengths: padding and masks matter
    c = tiny(policy, overrides_extra=["--reward.functions", "[tests.rl.rewards:digit_count]", "--generation.max_new_tokens", "24",
                                      "--generation.num_generations", "4"]).job()
    ours = _Rlhfspec(c, policy, tmp_path / "run", log=lambda m: None)
    try:
        ours.step()
    finally:
        ours.close()
    first, rows = ours.first, prompt_source(c).next(c.data.prompts_per_iteration)
    assert first["grad_norm"] > 0 and len(set(map(len, first["completions"]))) > 1

    def replayed(job, out):
        return update_gap(first, trl_grpo.replay(job, policy, rows, [(first["prompt_ids"], first["completions"])], "float32", 4, out))

    same = replayed(c, tmp_path / "same")
    assert same["loss"]["trl"] == pytest.approx(same["loss"]["rlhfspec"], rel=1e-5, abs=1e-7)
    assert same["grad_norm"]["trl"] == pytest.approx(same["grad_norm"]["rlhfspec"], rel=1e-5)
    assert same["gradient_rel_diff"] < 1e-5 and same["update_rel_diff"] < 1e-3, same
    apart = replayed(replace(c, algorithm=replace(c.algorithm, aggregation="sequence-mean")), tmp_path / "apart")
    assert apart["gradient_rel_diff"] > 1e-2 and apart["update_rel_diff"] > 1e-2, apart
    # transformers' warm-up starts at rate 0 (rlhfspec's at 1 / warmup_steps): the gradients still
    # compare, the updates do not, and the report says so rather than dividing by TRL's zero step
    warm = replayed(replace(c, train=replace(c.train, warmup_steps=2)), tmp_path / "warm")
    assert warm["lr"]["trl"] == 0 and warm["update_rel_diff"] is None and warm["gradient_rel_diff"] < 1e-5, warm


def test_trls_steps_on_rlhfspecs_samples_of_three_iterations_end_at_rlhfspecs_weights(tmp_path):
    """Replayed over several iterations (AdamW's moments and the gradient clipping carried from step
    to step), TRL's weights after the last step are rlhfspec's; a difference that only shows from
    the second step on (Adam's first-moment decay: a first step moves by g / |g| whatever it is)
    passes the first step's check and fails this one."""
    policy = tiny_policy_dir(tmp_path / "policy", seed=1)
    c = tiny(policy, iterations=3, overrides_extra=["--reward.functions", "[tests.rl.rewards:digit_count]",
                                                   "--generation.max_new_tokens", "24", "--generation.num_generations", "4"]).job()
    ours = _Rlhfspec(c, policy, tmp_path / "run", log=lambda m: None, replay_iterations=3)
    try:
        for _ in range(3):
            ours.step()
    finally:
        ours.close()
    kept, source = ours.first, prompt_source(c)
    rows = [r for _ in range(3) for r in source.next(c.data.prompts_per_iteration)]
    assert len(kept["steps"]) == 3 and max(s["grad_norm"] for s in kept["steps"]) > c.train.max_grad_norm  # clipping engaged
    steps = [(s["prompt_ids"], s["completions"]) for s in kept["steps"]]

    def replayed(job, out):
        return update_gap(kept, trl_grpo.replay(job, policy, rows, steps, "float32", 4, out))

    same = replayed(c, tmp_path / "same")
    assert same["last_update_rel_diff"] < 1e-3, same
    for s in same["replayed_steps"]:
        assert s["loss"]["trl"] == pytest.approx(s["loss"]["rlhfspec"], rel=1e-5, abs=1e-7)
        assert s["grad_norm"]["trl"] == pytest.approx(s["grad_norm"]["rlhfspec"], rel=1e-5)
    later = replayed(replace(c, train=replace(c.train, adam_betas=(0.5, 0.999))), tmp_path / "later")
    assert later["update_rel_diff"] < 1e-3 and later["last_update_rel_diff"] > 1e-2, later


def test_taking_turns_changes_nothing_either_side_samples(tmp_path):
    """Each side draws from its own random streams (TRL in its own process), so the order of the
    turns moves no token: interleaved and back-to-back runs generate and score alike."""
    policy = tiny_policy_dir(tmp_path / "policy")
    runs = [run(tiny(policy, interleave=interleave), out_dir=tmp_path / str(interleave), log=lambda m: None)
            for interleave in (True, False)]
    assert runs[1]["order"] == ["rlhfspec", "rlhfspec", "trl", "trl"]
    for side in ("rlhfspec", "trl"):
        facts = [[(r["gen_tokens"], r["completion_len_max"], r["reward"]) for r in result["runs"][side]] for result in runs]
        assert facts[0] == facts[1], side


def test_a_failure_in_trls_process_is_raised_with_its_cause(tmp_path):
    policy = tiny_policy_dir(tmp_path / "policy")
    with pytest.raises(RlhfspecError, match="(?s)failed in its process.*does not divide"):
        run(tiny(policy, trl_micro_batch=3), out_dir=tmp_path / "out", log=lambda m: None)


def test_turns_alternate_in_abba_pairs_or_run_back_to_back():
    assert turn_order(3, True) == ["rlhfspec", "trl", "trl", "rlhfspec", "rlhfspec", "trl"]
    assert turn_order(2, False) == ["rlhfspec", "rlhfspec", "trl", "trl"]
    for n in (1, 4, 5):
        order = turn_order(n, True)
        assert order.count("rlhfspec") == order.count("trl") == n


def test_the_default_job_is_the_default_run():
    job, default = PeersBenchConfig().job(), load_config(DEFAULT_RUN)
    default.validate()
    for section in ("model", "data", "reward", "generation", "algorithm"):
        assert getattr(job, section) == getattr(default, section), section
    assert job.train.learning_rate == default.train.learning_rate and job.train.iterations == 4


def test_the_grpo_config_gives_one_optimizer_step_over_all_samples_with_token_mean_loss(tmp_path):
    c = load_config(DEFAULT_RUN, ["--data.curriculum", "false"])
    args = trl_grpo.trl_args(c, tmp_path, "bfloat16", micro_batch=8)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.steps_per_generation) == (8, 8, 8)
    assert args.generation_batch_size == 64 and args.num_generations == 8 and args.max_completion_length == 128
    assert (args.loss_type, args.beta, args.epsilon, args.learning_rate) == ("dapo", 0.0, 0.2, 3e-5)
    assert (args.lr_scheduler_type.value, args.optim.value, args.bf16, args.gradient_checkpointing) == ("constant", "adamw_torch", True, False)
    assert not args.shuffle_dataset
    with pytest.raises(RlhfspecError, match="does not divide"):
        trl_grpo.trl_args(c, tmp_path, "float32", micro_batch=5)


@pytest.mark.parametrize("override, culprit", [(["--algorithm.name", "rloo"], "algorithm.name"),
                                               (["--data.curriculum", "true"], "data.curriculum"),
                                               (["--train.mini_batches", "2"], "train.mini_batches")])
def test_settings_trl_cannot_match_are_refused_naming_the_setting(override, culprit):
    c = load_config(DEFAULT_RUN, ["--data.curriculum", "false", *override])
    with pytest.raises(RlhfspecError, match=culprit):
        trl_grpo.check_mappable(c)


def test_the_trl_micro_batch_is_the_largest_divisor_within_rlhfspecs_token_budget():
    assert default_micro_batch(64, 188, 2048) == 8
    assert default_micro_batch(16, 124, 2048) == 16
    assert default_micro_batch(64, 4096, 2048) == 1
