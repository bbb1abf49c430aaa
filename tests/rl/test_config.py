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
