"""Fixtures of the eagle and tree tests: a tiny float32 policy, and a tiny policy over the
8-token vocabulary of the exact-distribution tests with its transformers twin."""

import pytest

from rlhfspec import load_model
from tests.conftest import tiny_hf_model
from tests.engine.test_spec_statistics import VOCAB


@pytest.fixture
def policy(tiny_checkpoint):
    return load_model(tiny_checkpoint("llama", seed=0), dtype="float32")[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    overrides = dict(vocab_size=VOCAB, initializer_range=0.6)
    path = tmp_path_factory.mktemp("policy")
    tiny_hf_model("llama", seed=0, **overrides).save_pretrained(path)
    return load_model(path, dtype="float32")[0], tiny_hf_model("llama", seed=0, **overrides)
