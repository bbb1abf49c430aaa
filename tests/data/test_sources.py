"""Prompt sources: files in three formats, clear errors for malformed rows, resumable positions."""

import json

import pytest

from rlhfspec import RlhfspecError
from rlhfspec.data.sources import ArithmeticSource, FileSource, make_source, read_rows
from rlhfspec.rewards.builtin import parse_answer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_parquet_and_datasets_directory_give_the_same_rows(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "answer": i} for i in range(5)] + [{"messages": [{"role": "user", "content": "hi"}], "answer": 9}]
    j = write_jsonl(tmp_path / "p.jsonl", rows)
    ds = datasets.Dataset.from_list([{"prompt": r.get("prompt", ""), "answer": r["answer"]} for r in rows[:5]])
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "dir"))
    got = read_rows(j)
    assert got[-1]["prompt"] == [{"role": "user", "content": "hi"}]
    assert [r["prompt"] for r in read_rows(tmp_path / "p.parquet")] == [r["prompt"] for r in got[:5]]
    assert [r["answer"] for r in read_rows(tmp_path / "dir")] == list(range(5))


@pytest.mark.parametrize(
    "line, message",
    [('{"prompt": ""}', "row 2 has no usable 'prompt'"), ("{not json", "row 2 is not valid JSON"),
     ('{"messages": [{"content": "x"}]}', "row 2 has no usable"), ('[1, 2]', "row 2 is not an object")],
)
def test_a_malformed_row_names_file_and_row(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(RlhfspecError, match=message) as e:
        read_rows(path)
    assert "bad.jsonl" in str(e.value)


def test_missing_or_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(RlhfspecError, match="does not exist"):
        make_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(RlhfspecError, match="not .jsonl, .parquet"):
        make_source(str(tmp_path / "x.csv"))


def test_file_source_resumes_where_it_stopped_and_covers_each_epoch(tmp_path):
    rows = [{"prompt": f"q{i}"} for i in range(7)]
    a = FileSource(rows, seed=3)
    first = [r["prompt"] for r in a.next(3)]
    state = a.state_dict()
    rest = [r["prompt"] for r in a.next(9)]
    b = FileSource(rows, seed=3)
    b.load_state_dict(state)
    assert [r["prompt"] for r in b.next(9)] == rest
    assert sorted(first + rest[:4]) == sorted(f"q{i}" for i in range(7))


def test_a_checkpointed_source_resumed_with_other_data_is_one_sentence():
    rows = [{"prompt": f"q{i}"} for i in range(7)]
    dataset, arithmetic = FileSource(rows).state_dict(), ArithmeticSource().state_dict()
    with pytest.raises(RlhfspecError, match="written with prompts from a dataset, and this run takes them from the built-in arithmetic task"):
        ArithmeticSource().load_state_dict(dataset)
    with pytest.raises(RlhfspecError, match="written with prompts from the built-in arithmetic task, and this run takes them from a dataset"):
        FileSource(rows).load_state_dict(arithmetic)
    with pytest.raises(RlhfspecError, match="a dataset of 7 rows and this one has 6"):
        FileSource(rows[:6]).load_state_dict(dataset)
    # checkpoints written before the kind was kept
    FileSource(rows).load_state_dict({"epoch": 1, "position": 2})
    with pytest.raises(RlhfspecError, match="from the built-in arithmetic task, and this run takes them from a dataset"):
        FileSource(rows).load_state_dict({"batches": 1, "digits": 1})


def test_arithmetic_answers_are_right_and_the_curriculum_moves():
    src = ArithmeticSource(seed=1, digits=1, terms=3)
    for row in src.next(50):
        expr = row["prompt"].split("What is ")[1].split("?")[0]
        assert eval(expr) == row["answer"] >= 0
    src.observe(0.9)
    assert src.digits == 2 and all(len(str(x)) == 2 for x in [int(t) for t in src.next(5)[0]["prompt"].split("?")[0].split() if t.isdigit()])
    src.observe(0.0)
    assert src.digits == 1


@pytest.mark.parametrize("text, value", [("so 7 + 5 = 12.\nAnswer: 12", 12), ("The answer is 3,400.", 3400), ("#### -7", -7), ("no digits", None), ("1 then 2", 2)])
def test_answer_parsing(text, value):
    assert parse_answer(text) == value


def test_rl_style_prompts_are_whole_prompts_of_each_kind():
    from rlhfspec.data.tasks import CODE, WORD_PROBLEMS, rl_style_prompts

    prompts = rl_style_prompts(9, seed=3)
    assert all(len(p) > 20 for p in prompts)
    assert sum(p in WORD_PROBLEMS for p in prompts) == 3 and sum(p in CODE for p in prompts) == 3


def test_heldout_rl_style_prompts_are_never_training_prompts():
    from rlhfspec.data.tasks import HELDOUT_CODE, HELDOUT_WORD_PROBLEMS, rl_style_prompts

    # The request lists share no prompt, and held-out arithmetic has three terms where training's has
    # two, so no seed and no size draws a held-out prompt for training.
    train = {p for seed in range(20) for p in rl_style_prompts(300, seed)}
    held = rl_style_prompts(300, seed=10_000, heldout=True)
    assert not train & set(held)
    assert sum(p in HELDOUT_WORD_PROBLEMS for p in held) == 100 and sum(p in HELDOUT_CODE for p in held) == 100
    assert all(p.count("+") + p.count("-") == 2 for p in held[::3])
    assert rl_style_prompts(30, seed=4) == rl_style_prompts(30, seed=4, heldout=False)
