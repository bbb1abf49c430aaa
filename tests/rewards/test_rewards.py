"""Reward functions: TRL's signature, weights, None handling, errors, and HF reward models."""

import math

import pytest
import torch

from rlhfspec import RlhfspecError
from rlhfspec.rewards.builtin import answer_format, arithmetic_correct
from rlhfspec.rewards.compose import RewardSet


def test_weighted_sum_ignores_none_like_trl():
    def half(prompts, completions, **_):
        return [0.5, None, 1.0]

    table, total = RewardSet([half, arithmetic_correct], [2.0, 1.0]).score(
        ["p"] * 3, ["Answer: 4", "Answer: 5", "x"], [[1]] * 3, {"answer": [4, 4, None]})
    assert math.isnan(table[1, 0]) and math.isnan(table[2, 1])
    assert total.tolist() == [2.0, 0.0, 2.0]


def test_a_sample_no_function_scores_is_warned_of_as_trl_does():
    def some(prompts, completions, **_):
        return [None, 1.0, None]

    with pytest.warns(UserWarning, match=r"every reward function returned None for 2 of 3 samples \(the first: sample 0, prompt 'p0'\); their reward is 0"):
        _, total = RewardSet([some]).score(["p0", "p1", "p2"], ["a", "b", "c"], [[1]] * 3, {})
    assert total.tolist() == [0.0, 1.0, 0.0]


def test_builtins_score_answers_and_format():
    assert arithmetic_correct(None, ["Answer: 12", "12 apples", "Answer: 13"], answer=[12, 12, 12]) == [1.0, 1.0, 0.0]
    assert answer_format(None, ["work...\nAnswer: 12", "12"]) == [0.2, 0.0]
    assert arithmetic_correct(None, [[{"role": "assistant", "content": "Answer: 3"}]], answer=[3]) == [1.0]


def test_a_raising_function_is_named_with_its_sample():
    def picky(prompts, completions, **_):
        if any("bad" in c for c in completions):
            raise KeyError("bad input")
        return [1.0] * len(completions)

    with pytest.raises(RlhfspecError, match=r"reward function picky raised KeyError: 'bad input' on sample 2 \(prompt 'p2'\)"):
        RewardSet([picky]).score(["p0", "p1", "p2"], ["ok", "fine", "bad"], [[1]] * 3, {})


@pytest.mark.parametrize("returned, message", [([1.0], "returned 1 rewards for 2"), (["x", 1.0], "returned 'x' for sample 0"),
                                               ([float("nan"), 1.0], "returned nan for sample 0"), ([1.0, float("-inf")], "returned -inf for sample 1"),
                                               (1.0, "returned a float, not a list of 2 rewards"), (None, "returned None, not a list of 2"),
                                               ((r for r in (1.0, 2.0)), "returned a generator, not a list"), ("ab", "returned a str, not a list")])
def test_bad_reward_values_are_clear_errors(returned, message):
    with pytest.raises(RlhfspecError, match=message):
        RewardSet([lambda prompts, completions, **_: returned]).score(["a", "b"], ["x", "y"], [[1], [2]], {})


def test_unknown_reward_names_are_clear_errors():
    with pytest.raises(RlhfspecError, match="not built in"):
        RewardSet(["no_such_reward"])
    with pytest.raises(RlhfspecError, match="could not be imported"):
        RewardSet(["no.such.module:fn"])
    with pytest.raises(RlhfspecError, match="reward function 42 is neither a function nor a name"):
        RewardSet([42])
    with pytest.raises(RlhfspecError, match="reward function 'math:pi' is a float, not a function"):
        RewardSet(["math:pi"])


def test_reward_model_scores_equal_transformers_sequence_classification(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rlhfspec.rewards.reward_model import RewardModel
    from tests.conftest import TINY
    from tests.rl.helpers import tiny_policy_dir

    tok_dir = tiny_policy_dir(tmp_path / "tok")
    cfg = AutoConfig.for_model("llama", **{**TINY, "vocab_size": 70, "num_labels": 1, "pad_token_id": 0})
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_config(cfg).eval()
    hf.save_pretrained(tmp_path / "rm")
    for f in tok_dir.glob("tokenizer*"):
        (tmp_path / "rm" / f.name).write_bytes(f.read_bytes())
    rm = RewardModel(tmp_path / "rm")
    texts = [("What is 2 + 2 ?", " Answer : 4"), ("What is 9 - 1 ?", " 8")]
    ids = [rm.encode(p, c) for p, c in texts]
    want = [hf(torch.tensor([i])).logits[0, 0].item() for i in ids]
    assert rm(prompts=[p for p, _ in texts], completions=[c for _, c in texts]) == pytest.approx(want, abs=1e-4)
