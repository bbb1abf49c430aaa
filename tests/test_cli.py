"""Command-line parsing: flags that take special values, and bad values rejected before any work."""

import argparse

import pytest

from rlhfspec.cli.generate import draft_tokens
from rlhfspec.cli.main import main
from rlhfspec.errors import RlhfspecError


def test_num_draft_tokens_takes_an_integer_or_auto():
    assert draft_tokens("3") == 3 and draft_tokens("auto") == "auto"
    with pytest.raises(argparse.ArgumentTypeError, match="neither an integer nor 'auto'"):
        draft_tokens("many")


@pytest.mark.parametrize("args", [["--backend", "mpi"], ["--realloc", "maybe"], ["--num-draft-tokens", "many"]])
def test_bad_generate_flags_exit_with_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", *args])
    assert e.value.code == 2 and f"error: argument {args[0]}" in capsys.readouterr().err


def test_a_bad_instance_count_is_a_clear_error(capsys):
    assert main(["generate", "--model", "/nonexistent", "--instances", "0"]) == 2
    assert "--instances must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--layers", "0"], "--layers must be at least 1"),
    (["--hidden", "200"], "--hidden must be even, and a multiple of 64"),
    (["--lr", "0"], "--lr must be positive"),
    (["--train-prompts", "-3"], "--train-prompts must be positive"),
    (["--draft-vocab", "1"], "--draft-vocab must be between 2"),
    (["--kind", "eagle", "--draft-vocab", "1"], "--draft-vocab must be between 2"),
    (["--kind", "eagle", "--layers", "2"], "--layers and --hidden shape a draft model"),
    (["--feature-weight", "0.5"], "pass --kind eagle"),
    (["--unroll", "on"], "pass --kind eagle"),
    (["--prompts-from", "/nonexistent/run.yaml"], "config file /nonexistent/run.yaml does not exist"),
    (["--kind", "eagle", "--prompts-from", "/nonexistent/run.yaml"], "config file /nonexistent/run.yaml does not exist"),
])
def test_bad_distill_settings_are_clear_errors_before_any_work(args, message, capsys):
    assert main(["distill-draft", "--policy", "/nonexistent", "--out", "/nonexistent/out", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "--samples is 0; it must be at least 1"),
    (["--max-new-tokens", "0"], "max_new_tokens is 0"),
    (["--top-p", "2"], "top_p is 2.0"),
    (["--prompt", "  "], "prompt 0 is empty"),
    (["--json", "/nonexistent/dir/out.jsonl"], "directory /nonexistent/dir does not exist"),
    (["--drafter", "ngram", "--strategy", "threshold", "--num-draft-tokens", "auto"], "cannot go with --strategy threshold"),
    (["--drafter", "ngram", "--strategy", "threshold", "--threshold-batch", "0"], "the threshold strategy's batch is 0"),
    (["--num-draft-tokens", "auto"], "the adaptive strategy needs at least one drafter"),
    (["--drafter", "ngramm"], "--drafter 'ngramm' is neither a drafter (ngram, draft, eagle, eagle-tree) nor the path"),
])
def test_bad_generate_settings_are_clear_errors_before_the_model_loads(args, message, capsys):
    # The model path does not exist: reaching load_model would be a different error.
    assert main(["generate", "--model", "/nonexistent", *args]) == 2
    assert message in capsys.readouterr().err


def test_an_empty_prompts_file_is_an_error_not_the_demo_prompts(tmp_path, capsys):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    assert main(["generate", "--model", "/nonexistent", "--prompts-file", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err


def test_a_prompts_file_row_without_a_text_prompt_is_an_error_naming_its_line(tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 5}\n')
    assert main(["generate", "--model", "/nonexistent", "--prompts-file", str(bad)]) == 2
    assert f"{bad} line 2 has no usable 'prompt' (a non-empty string)" in capsys.readouterr().err


def test_resuming_a_finished_run_says_there_is_nothing_to_do(tmp_path, capsys):
    from tests.rl.helpers import tiny_policy_dir

    policy = tiny_policy_dir(tmp_path / "policy")
    args = ["train", "--no-progress", "--model.policy", str(policy), "--run.output_dir", str(tmp_path / "run"),
            "--data.prompts_per_iteration", "2", "--generation.num_generations", "2", "--generation.max_new_tokens", "4",
            "--generation.speculative", "false", "--run.tensorboard", "false", "--train.iterations", "1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "has already run 1 iterations (train.iterations is 1); nothing to do" in capsys.readouterr().out


def test_plot_of_a_missing_run_directory_is_an_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_a_bench_table_goes_to_results_md_only_when_recorded(tmp_path):
    from rlhfspec.bench.common import RESULTS, results_file, write_section

    scratch = results_file(record=False)
    assert scratch != RESULTS and results_file(record=True) == RESULTS
    note = write_section("x", "| a |", path=scratch)
    assert "not recorded" in note and "<!-- bench:x -->" in scratch.read_text()


@pytest.mark.parametrize("argv, module, expected", [
    (["bench", "e2e", "--iterations", "2", "--compare", "precision"], "e2e", {"compare": "precision"}),
    (["bench", "e2e", "--iterations", "2"], "e2e", {"compare": "features"}),
    (["bench", "refresh", "--iterations", "2"], "refresh", {}),
])
def test_bench_commands_reach_their_benchmark_with_their_flags(argv, module, expected, monkeypatch):
    import importlib

    calls = []
    bench = importlib.import_module(f"rlhfspec.bench.{module}")
    monkeypatch.setattr(bench, "run", lambda *a, **k: calls.append((a, k)))
    assert main(argv) == 0
    (args, kwargs), = calls
    assert args[1] == 2  # iterations
    assert {k: kwargs[k] for k in expected} == expected


def test_bench_spec_measures_on_heldout_prompts_unless_told(monkeypatch):
    from rlhfspec.bench import spec
    from rlhfspec.bench.spec import SpecBenchConfig

    calls = []
    monkeypatch.setattr(spec, "run", lambda cfg, **k: calls.append(cfg))
    assert main(["bench", "spec", "--quick"]) == 0 and main(["bench", "spec", "--quick", "--prompts", "train"]) == 0
    assert [c.prompts for c in calls] == ["heldout", "train"]
    assert "--prompts" not in calls[0].command() and "--prompts train" in calls[1].command()
    with pytest.raises(RlhfspecError, match="must be heldout or train"):
        SpecBenchConfig(prompts="test")
