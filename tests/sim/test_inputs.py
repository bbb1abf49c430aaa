"""Bad inputs to the simulator are one sentence naming the culprit."""

import json

import pytest

from rlhfspec.engine.spec import Static
from rlhfspec.errors import RlhfspecError
from rlhfspec.sim import AcceptanceProfile, SimConfig, TableCost, Workload, accelerator, model_config, simulate
from rlhfspec.sim.ablation import build
from rlhfspec.sim.workload import lengths, read_trace
from tests.sim.helpers import cluster, table_cost, workload


def one_sentence(excinfo, *words):
    msg = str(excinfo.value)
    assert msg.endswith(".") and "\n" not in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("spec", ["lognormal:400,1.0", "lognormal:a,1,4096", "lognormal:400,1,4096,9", "lognormal:-5,1,100"])
def test_bad_lognormal_spec(spec):
    with pytest.raises(RlhfspecError) as e:
        lengths(spec, 4, 0)
    one_sentence(e, "lognormal")


def test_unknown_length_spec_and_bad_trace(tmp_path):
    with pytest.raises(RlhfspecError) as e:
        lengths("gamma:3,4", 4, 0)
    one_sentence(e, "gamma:3,4")
    trace = tmp_path / "lengths.json"
    trace.write_text(json.dumps([10, 20, 30]))
    assert lengths(str(trace), 3, 0) == [10, 20, 30]
    with pytest.raises(RlhfspecError) as e:
        lengths(str(trace), 8, 0)
    one_sentence(e, "3 lengths for 8 samples")
    trace.write_text('{"lengths": ["x"]}')
    with pytest.raises(RlhfspecError) as e:
        read_trace(str(trace))
    one_sentence(e, "not a list of integers")


def test_unknown_accelerator_and_model(tmp_path):
    with pytest.raises(RlhfspecError) as e:
        accelerator("TPU9")
    one_sentence(e, "TPU9", "H100")
    with pytest.raises(RlhfspecError) as e:
        model_config("13B")
    one_sentence(e, "13B", "70B")
    with pytest.raises(RlhfspecError) as e:
        model_config(str(tmp_path / "missing" / "config.json"))
    one_sentence(e, "does not exist")


def test_model_from_config_json(tmp_path):
    from rlhfspec.models.catalog import CATALOG

    (tmp_path / "config.json").write_text(json.dumps(CATALOG["qwen2.5-7b"]))
    assert model_config(str(tmp_path)).num_params == model_config("7B").num_params


@pytest.mark.parametrize("spec, words", [
    ("draft=1.5", ["draft", "[0, 1]"]), ("draft=0.5,x", ["draft=0.5,x"]), ("=0.5", ["names no drafter"]),
    ("no-such-file.json", ["no-such-file.json"]),
])
def test_bad_acceptance_profile(spec, words):
    with pytest.raises(RlhfspecError) as e:
        AcceptanceProfile.parse(spec)
    one_sentence(e, *words)


def test_strategy_drafting_with_a_drafter_without_profile():
    with pytest.raises(RlhfspecError) as e:
        simulate(table_cost(lambda b, q: 0.01), workload([10] * 4), cluster(), Static("ngram", 2))
    one_sentence(e, "ngram", "acceptance profile")


def test_table_without_the_drafters_cost(tmp_path):
    cost = TableCost({(1, 1): 0.01, (8, 1): 0.02})
    with pytest.raises(RlhfspecError) as e:
        cost.draft("draft", 4, 2, 100.0)
    one_sentence(e, "draft")
    with pytest.raises(RlhfspecError) as e:
        TableCost.load(tmp_path / "none.json")
    one_sentence(e, "does not exist")


def test_model_that_does_not_fit_the_gpu():
    with pytest.raises(RlhfspecError) as e:
        build(SimConfig(model="70B", tp=1, prompts=2, samples=2))
    one_sentence(e, "70B", "--tp")


def test_samples_of_one_prompt_with_different_prompt_lengths():
    with pytest.raises(RlhfspecError, match="sample 1 answers prompt 0 with a prompt of 12 tokens"):
        Workload([16, 12], [5, 5], 8, AcceptanceProfile.parse("draft=0.8", 0), prompt_ids=[0, 0])
