"""Prompt sources for RL: files (JSONL, Parquet, a datasets directory) and the built-in arithmetic task.

A source hands out batches of rows ({"prompt": str | messages, other columns...}) in a seeded
order and saves its position, so a resumed run sees the prompts it would have seen.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlhfspec.data.tasks import REASONING, arithmetic_problems
from rlhfspec.errors import RlhfspecError


def check_row(row, where: str, column: str = "prompt") -> dict:
    """The row with its prompt under "prompt" (text, or chat turns from `column` or "messages"), or
    one sentence naming `where` on what is missing."""
    if not isinstance(row, dict):
        raise RlhfspecError(f"{where} is not an object with a '{column}' or 'messages' field.")
    prompt = row.get("messages") if column == "messages" else row.get(column, row.get("messages"))
    if isinstance(prompt, str) and prompt.strip():
        return {**row, "prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return {**row, "prompt": prompt}
    raise RlhfspecError(f"{where} has no usable '{column}' (a non-empty string) or 'messages' (a list of role/content turns).")


def read_rows(path: str | Path, column: str = "prompt") -> list[dict]:
    """Every row of a .jsonl or .parquet file or a `datasets` directory, validated."""
    path = Path(path)
    if not path.exists():
        raise RlhfspecError(f"dataset {path} does not exist.")
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise RlhfspecError("reading a datasets directory needs the datasets package: pip install datasets") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        raw = list(ds)
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RlhfspecError("reading Parquet needs pyarrow: pip install pyarrow") from None
        raw = pq.read_table(str(path)).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        raw = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RlhfspecError(f"{path} row {n} is not valid JSON ({e.msg}).") from None
    else:
        raise RlhfspecError(f"dataset {path} is not .jsonl, .parquet or a datasets directory.")
    rows = [check_row(r, f"{path} row {i}", column) for i, r in enumerate(raw, start=1)]
    if not rows:
        raise RlhfspecError(f"dataset {path} has no rows.")
    return rows


class FileSource:
    """Rows of a dataset, reshuffled every epoch with a seeded generator."""

    def __init__(self, rows: list[dict], seed: int = 0, shuffle: bool = True):
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            order = self._order()
            take = order[self.position : self.position + n - len(out)]
            out.extend(self.rows[i] for i in take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def observe(self, success: float) -> None:
        """Files have no curriculum."""

    def state_dict(self) -> dict:
        return {"kind": "dataset", "rows": len(self.rows), "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, "dataset")
        if state.get("rows", len(self.rows)) != len(self.rows):
            raise RlhfspecError(f"the checkpoint was written over a dataset of {state['rows']} rows and this one has {len(self.rows)}; "
                                "resume with the run's own data (data.task, or the same train_dataset).")
        self.epoch, self.position = state["epoch"], state["position"]


class ArithmeticSource:
    """Arithmetic problems generated from (seed, batch number), with a curriculum on the number of
    digits: up after a batch solved more than 70% of the time, down below 10%."""

    def __init__(self, seed: int = 0, digits: int = 1, terms: int = 2, ops: str = "+-", curriculum: bool = True, template: str = REASONING):
        self.seed, self.digits, self.terms, self.ops = seed, digits, terms, ops
        self.curriculum, self.template = curriculum, template
        self.batches = 0

    def next(self, n: int) -> list[dict]:
        problems = arithmetic_problems(n, self.seed * 1_000_003 + self.batches, self.digits, self.ops, self.terms, self.template)
        self.batches += 1
        return [{"prompt": p.prompt, "answer": p.answer, "digits": self.digits} for p in problems]

    def observe(self, success: float) -> None:
        if not self.curriculum:
            return
        if success > 0.7:
            self.digits += 1
        elif success < 0.1 and self.digits > 1:
            self.digits -= 1

    def state_dict(self) -> dict:
        return {"kind": "arithmetic", "batches": self.batches, "digits": self.digits}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, "arithmetic")
        self.batches, self.digits = state["batches"], state["digits"]


def _check_kind(state: dict, kind: str) -> None:
    """One sentence when a checkpoint's prompt source is not of this kind (checkpoints written
    before "kind" was kept are told apart by their keys)."""
    written = state.get("kind") or ("arithmetic" if "batches" in state else "dataset" if "epoch" in state else None)
    if written != kind:
        names = {"arithmetic": "the built-in arithmetic task", "dataset": "a dataset"}
        raise RlhfspecError(f"the checkpoint was written with prompts from {names.get(written, 'another source')}, and this run "
                            f"takes them from {names[kind]}; resume with the run's own data (data.task, or the same train_dataset).")


def make_source(task, column: str = "prompt", seed: int = 0, shuffle: bool = True, **arith):
    """"arithmetic", a dataset path, a `datasets.Dataset`, or a list of row dicts."""
    if isinstance(task, str) and task == "arithmetic":
        return ArithmeticSource(seed=seed, **arith)
    if isinstance(task, (str, Path)):
        return FileSource(read_rows(task, column), seed=seed, shuffle=shuffle)
    rows = task if isinstance(task, list) else _dataset_rows(task)
    checked = [check_row(r, f"dataset row {i}", column) for i, r in enumerate(rows, start=1)]
    if not checked:
        raise RlhfspecError("the dataset has no rows.")
    return FileSource(checked, seed=seed, shuffle=shuffle)


def _dataset_rows(dataset) -> list:
    """Rows of a `datasets.Dataset` (or DatasetDict: its train split)."""
    if hasattr(dataset, "keys") and callable(dataset.keys) and not isinstance(dataset, dict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    try:
        return list(dataset)
    except TypeError:
        raise RlhfspecError(f"the dataset is a {type(dataset).__name__}; pass a datasets.Dataset, a list of row dicts or a path.") from None
