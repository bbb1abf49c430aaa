import pytest

from tests.rl.helpers import tiny_policy_dir


@pytest.fixture
def policy(tmp_path):
    """A tiny policy checkpoint with tokenizer files."""
    return tiny_policy_dir(tmp_path / "policy")
