"""Config: YAML sections map onto dataclasses one to one; overrides and errors."""

import pytest

from rlhfspec import RlhfspecError
from rlhfspec.rl.config import Config
from rlhfspec.rl.config_files import load_config


def test_the_default_config_file_equals_the_built_in_defaults():
    assert load_config("configs/grpo_arith.yaml").to_dict() == Config().to_dict()


def test_overrides_are_typed(tmp_path):
    c = load_config(None, ["--train.learning_rate", "3e-6", "--generation.speculative", "off", "algorithm.clip_high=0.28",
                           "--generation.drafters", "[ngram, draft]", "--train.adam_betas", "[0.9, 0.95]"])
    assert (c.train.learning_rate, c.generation.speculative, c.algorithm.clip_high) == (3e-6, False, 0.28)
    assert c.generation.drafters == ["ngram", "draft"] and c.train.adam_betas == (0.9, 0.95)


@pytest.mark.parametrize(
    "overrides, message",
    [(["--train.lr", "1"], "train has no setting 'lr'"), (["--nope.x", "1"], "is not section.key"),
     (["--train.iterations", "many"], "train.iterations = 'many' is not a valid int"), (["--train.iterations"], "has no value")],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(RlhfspecError, match=message):
        load_config(None, overrides)


def test_yaml_with_an_unknown_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(RlhfspecError, match="unknown section 'optimizer'"):
        load_config(path)


def test_command_line_text_stays_text_and_unreadable_values_are_one_sentence():
    c = load_config(None, ["--run.output_dir", "010", "--model.policy", "1_000", "--data.task", "0x10", "--model.reference", "null"])
    # YAML would read these as the numbers 8, 1000 and 16
    assert (c.run.output_dir, c.model.policy, c.data.task, c.model.reference) == ("010", "1_000", "0x10", None)
    with pytest.raises(RlhfspecError, match=r"^command line: --reward.functions '\[myrew:lenrew' cannot be read as a value \(expected"):
        load_config(None, ["--reward.functions", "[myrew:lenrew"])


@pytest.mark.parametrize("text, message", [
    ("train: {iterations: 1\n", r"c.yaml is not valid YAML: expected ',' or '}', but got '<stream end>' at line 2, column 1\.$"),
    ("train: 5\n", r"c.yaml: section train must be a mapping of settings \(key: value\), not 5\.$"),
    ("train:\n  - {iterations: 1}\n", r"section train must be a mapping of settings \(key: value\), not \[\{'iterations': 1\}\]"),
])
def test_a_malformed_config_file_is_one_sentence(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(RlhfspecError, match=message):
        load_config(path)


def test_settings_made_in_python_are_typed_as_a_file_s_and_a_misspelt_one_is_refused():
    from pathlib import Path

    c = Config()
    c.generation.speculative, c.train.learning_rate, c.run.output_dir = "false", "1e-5", Path("runs/x")
    c.validate()
    assert (c.generation.speculative, c.train.learning_rate, c.run.output_dir) == (False, 1e-5, "runs/x")
    c.train.iterations = "many"
    with pytest.raises(RlhfspecError, match=r"^config: train.iterations = 'many' is not a valid int\.$"):
        c.validate()
    with pytest.raises(AttributeError, match="'TrainConfig' object has no attribute 'learnig_rate'"):
        c.train.learnig_rate = 1e-5
