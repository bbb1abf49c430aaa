"""Resolve reward functions by name, call them, and combine them with weights."""

from __future__ import annotations

import importlib
import math
import os
import sys
import warnings
from typing import Callable

import torch

from rlhfspec.errors import RlhfspecError
from rlhfspec.rewards.builtin import BUILTIN

RewardFn = Callable[..., list]


def resolve(spec: str | RewardFn) -> RewardFn:
    """A built-in name, 'package.module:function', or a callable."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise RlhfspecError(f"reward function {spec!r} is neither a function nor a name: give a callable, a built-in name "
                            f"({', '.join(BUILTIN)}) or 'module:function'.")
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" in spec:
        module, _, name = spec.partition(":")
        # Like a script's own modules: importable from the current directory.
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise RlhfspecError(f"reward function {spec!r} could not be imported ({e}); it is looked up in the current directory "
                                f"({os.getcwd()}) and on PYTHONPATH.") from None
        if not callable(fn):
            raise RlhfspecError(f"reward function {spec!r} is a {type(fn).__name__}, not a function.")
        return fn
    raise RlhfspecError(f"reward function {spec!r} is not built in ({', '.join(BUILTIN)}) and not 'module:function'.")


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


class RewardSet:
    """Several reward functions with weights; `score` returns per-function rewards and their weighted sum.

    A function returning None for a sample does not count for that sample (TRL's nansum). A
    function that raises stops the iteration with an error naming it and the sample.
    """

    def __init__(self, functions: list, weights: list[float] | None = None):
        if not functions:
            raise RlhfspecError("at least one reward function is needed.")
        self.functions = [resolve(f) for f in functions]
        self.weights = [1.0] * len(self.functions) if weights is None else list(weights)
        if len(self.weights) != len(self.functions):
            raise RlhfspecError(f"{len(self.weights)} reward weights for {len(self.functions)} reward functions.")
        self.names = [_name(f) for f in self.functions]

    def score(self, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-function rewards [N, F] with NaN for None, weighted totals [N])."""
        n = len(completions)
        table = torch.full((n, len(self.functions)), float("nan"), dtype=torch.float64)
        for j, fn in enumerate(self.functions):
            try:
                values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            except Exception as e:  # user code: report which function and which sample, never swallow
                i = self._culprit(fn, prompts, completions, completion_ids, columns)
                where = f"sample {i} (prompt {str(prompts[i])[:60]!r})" if i is not None else f"a batch of {n} samples"
                raise RlhfspecError(
                    f"reward function {self.names[j]} raised {type(e).__name__}: {e} on {where}; the iteration was not committed."
                ) from e
            if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
                raise RlhfspecError(f"reward function {self.names[j]} returned {'None' if values is None else 'a ' + type(values).__name__}, not a list of {n} rewards "
                                    "(a number or None for each completion).")
            if len(values) != n:
                raise RlhfspecError(f"reward function {self.names[j]} returned {len(values)} rewards for {n} completions.")
            for i, v in enumerate(values):
                if v is None:
                    continue
                try:
                    table[i, j] = float(v)
                except (TypeError, ValueError):
                    raise RlhfspecError(f"reward function {self.names[j]} returned {v!r} for sample {i}, not a number or None.") from None
                if not math.isfinite(table[i, j]):
                    raise RlhfspecError(f"reward function {self.names[j]} returned {v!r} for sample {i} (prompt {str(prompts[i])[:60]!r}); "
                                        "a reward must be a finite number or None.")
        unscored = table.isnan().all(dim=1).nonzero().flatten().tolist()
        if unscored:  # as TRL warns: such a sample's reward is 0, which is rarely what was meant
            warnings.warn(f"every reward function returned None for {len(unscored)} of {n} samples (the first: sample {unscored[0]}, "
                          f"prompt {str(prompts[unscored[0]])[:60]!r}); their reward is 0.", stacklevel=2)
        weights = torch.tensor(self.weights, dtype=torch.float64)
        return table, (table * weights).nansum(dim=1)

    @staticmethod
    def _culprit(fn, prompts, completions, completion_ids, columns) -> int | None:
        """The first sample the function fails on when called alone."""
        for i in range(len(completions)):
            try:
                fn(prompts=prompts[i : i + 1], completions=completions[i : i + 1], completion_ids=completion_ids[i : i + 1],
                   **{k: v[i : i + 1] for k, v in columns.items()})
            except Exception:  # noqa: BLE001 - locating the failure is the point
                return i
        return None
