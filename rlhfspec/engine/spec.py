"""EngineSpec: the typed, picklable description of one generation instance, and its one builder.

The Python API (`generate`), the CLI, the RL config and the Ray backend all describe an instance
with an EngineSpec, so an instance is built in one place whatever asks for it. A new drafter or
strategy is one description class here (with its `build`) plus one line in DRAFTERS or STRATEGIES.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from rlhfspec.engine.drafters import DraftModelDrafter, Drafter, EagleDrafter, NgramDrafter
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.eagle import is_eagle_dir
from rlhfspec.paths import default_cache_dir, default_draft_path, default_eagle_path
from rlhfspec.strategy.base import StaticStrategy, Strategy

DEFAULT_MAX_BATCH = 64
MAX_DRAFT_TOKENS = 16


# --- drafters ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ngram:
    """Model-free suffix matching over the prompt, the sample's output and earlier responses."""

    max_ngram: int = 4
    min_ngram: int = 1
    name: str = "ngram"

    @classmethod
    def from_text(cls, text: str, taken: tuple[str, ...]) -> Ngram:
        return cls()

    def build(self, policy, tokenizer=None) -> Drafter:
        return NgramDrafter(self.max_ngram, self.min_ngram)


@dataclass(frozen=True)
class DraftModel:
    """A smaller LM sharing the policy's vocabulary, loaded from a directory (or .gguf file)."""

    path: str
    name: str = "draft"

    @classmethod
    def from_text(cls, text: str, taken: tuple[str, ...]) -> DraftModel:
        """"draft": the distilled default draft; else a path. The first draft model is named
        "draft", later ones "draft:<directory name>" (names key the statistics and logs)."""
        path = default_draft_path() if text == "draft" else Path(text)
        return cls(str(path), "draft" if "draft" not in taken else f"draft:{path.name}")

    def build(self, policy, tokenizer=None) -> Drafter:
        if not Path(self.path).exists():
            raise RlhfspecError(f"drafter {self.path}: the draft model does not exist; create it with: "
                                f"rlhfspec distill-draft --draft-vocab 8192 --out {self.path}")
        try:
            return DraftModelDrafter.load(self.path, policy, policy_tokenizer=tokenizer, name=self.name)
        except RlhfspecError as e:
            raise RlhfspecError(f"drafter {self.path}: {e}") from None


TREE_BRANCHES = 2  # "eagle-tree": chains per sample (measured: RESULTS.md, spec-eagle section)


@dataclass(frozen=True)
class Eagle:
    """An EAGLE-style head over the policy's own features, loaded from its directory; with
    branches > 1 it drafts trees of that many chains (engine/tree.py)."""

    path: str
    name: str = "eagle"
    branches: int = 1

    def __post_init__(self):
        if not isinstance(self.branches, int) or isinstance(self.branches, bool) or self.branches < 1:
            raise RlhfspecError(f"drafter {self.name}: branches is {self.branches!r}; it must be an integer >= 1.")

    @classmethod
    def from_text(cls, text: str, taken: tuple[str, ...]) -> Eagle:
        """"eagle": the default head; "eagle-tree": the default head drafting trees of
        TREE_BRANCHES chains; else a head directory. Named by the keyword (or "eagle"), then
        "<keyword>:<directory name>" when taken."""
        tree = text == "eagle-tree"
        path = default_eagle_path() if text in ("eagle", "eagle-tree") else Path(text)
        base = "eagle-tree" if tree else "eagle"
        return cls(str(path), base if base not in taken else f"{base}:{path.name}", TREE_BRANCHES if tree else 1)

    def build(self, policy, tokenizer=None) -> Drafter:
        if not Path(self.path).exists():
            raise RlhfspecError(f"drafter {self.path}: the eagle head does not exist; create it with: "
                                f"rlhfspec distill-draft --kind eagle --out {self.path}")
        try:
            return EagleDrafter.load(self.path, policy, name=self.name, branches=self.branches)
        except RlhfspecError as e:
            raise RlhfspecError(f"drafter {self.path}: {e}") from None


DrafterSpec = Ngram | DraftModel | Eagle
# Keywords a drafter is named by in the CLI and the RL config; anything else is a path, to an
# eagle head directory or a draft model.
DRAFTERS: dict[str, type] = {"ngram": Ngram, "draft": DraftModel, "eagle": Eagle, "eagle-tree": Eagle}


def check_drafter(text: str, setting: str) -> None:
    """One sentence when `text` is neither a drafter keyword nor an existing path: a misspelt
    keyword would otherwise be taken for a draft model's path and fail only once the policy has
    loaded."""
    if text not in DRAFTERS and not Path(text).exists():
        raise RlhfspecError(f"{setting} {text!r} is neither a drafter ({', '.join(DRAFTERS)}) nor the path of a draft model "
                            "or an eagle head.")


def drafter_spec(text: str, taken: tuple[str, ...] = ()) -> DrafterSpec:
    """The drafter a keyword of DRAFTERS or a path names (`taken`: names already used)."""
    kind = DRAFTERS.get(text) or (Eagle if is_eagle_dir(text) else DraftModel)
    return kind.from_text(text, taken)


# --- strategies -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Static:
    """The same drafter and draft length at every step."""

    drafter: str
    n: int = 4

    @classmethod
    def from_settings(cls, drafter: str, n: int, threshold_batch: int, max_n: int) -> Static:
        return cls(drafter, n)

    def build(self, policy, drafters: list[Drafter]) -> Strategy:
        return StaticStrategy(self.drafter, self.n)


@dataclass(frozen=True)
class Threshold:
    """A fixed drafter and draft length while the live batch is at most threshold_batch; plain above it."""

    drafter: str
    n: int = 4
    threshold_batch: int = 32

    @classmethod
    def from_settings(cls, drafter: str, n: int, threshold_batch: int, max_n: int) -> Threshold:
        return cls(drafter, n, threshold_batch)

    def build(self, policy, drafters: list[Drafter]) -> Strategy:
        from rlhfspec.strategy.selector import ThresholdStrategy

        return ThresholdStrategy(self.drafter, self.n, self.threshold_batch)


@dataclass(frozen=True)
class Adaptive:
    """The workload-aware selector: drafter and per-sample n (0..max_n) at every step, from a cost
    profile of this policy and these drafters (cached on disk; about 10 s the first time)."""

    max_n: int = 8

    @classmethod
    def from_settings(cls, drafter: str, n: int, threshold_batch: int, max_n: int) -> Adaptive:
        return cls(max_n)

    def build(self, policy, drafters: list[Drafter]) -> Strategy:
        from rlhfspec.engine.profile import cost_model
        from rlhfspec.strategy.selector import AdaptiveStrategy

        return AdaptiveStrategy(cost_model(policy, {d.name: d for d in drafters}, default_cache_dir()), max_n=self.max_n)


StrategySpec = Static | Threshold | Adaptive
STRATEGIES: dict[str, type] = {"static": Static, "threshold": Threshold, "adaptive": Adaptive}


def strategy_spec(kind: str, drafters: tuple, n: int = 4, threshold_batch: int = 32, max_n: int = 8,
                  required: bool = False) -> StrategySpec | None:
    """The strategy STRATEGIES names `kind`, over these drafters (static and threshold draft with
    the first); None without drafters, unless `required` (then one sentence)."""
    if kind not in STRATEGIES:
        raise RlhfspecError(f"strategy {kind!r} is not one of {', '.join(STRATEGIES)}.")
    if not drafters:
        if required:
            raise RlhfspecError(f"the {kind} strategy needs at least one drafter (ngram, a draft model, or a list).")
        return None
    return STRATEGIES[kind].from_settings(drafters[0].name, n, threshold_batch, max_n)


# --- the instance -----------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineSpec:
    """One generation instance: its drafters and strategy (None: plain decoding), how many samples
    run at once and how long they may grow, the precision and whether rows are batch-invariant.

    model: what `load_model` reads ("default", a Hugging Face directory or a .gguf file) where an
    instance loads its own (a Ray actor); in-process instances are handed the loaded policy and
    leave it None. max_len None: fitted to the prompts of the call."""

    drafters: tuple[DrafterSpec, ...] = ()
    strategy: StrategySpec | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_len: int | None = None
    dtype: str | None = None
    batch_invariant: bool = True
    threads: int | None = None
    model: str | None = None
    device: str = "cpu"  # where an instance that loads `model` puts it
    keep_targets: int = 0  # k > 0: each sample keeps a Trace (top-k targets, features) for drafter refreshes,
    trace_every: int = 1  # each whose sample_id is a multiple of trace_every

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """One sentence for a spec no instance could run."""
        if self.max_batch < 1:
            raise RlhfspecError(f"max_batch is {self.max_batch}; it must be at least 1.")
        if self.threads is not None and self.threads < 1:
            raise RlhfspecError(f"threads is {self.threads}; it must be at least 1.")
        if self.keep_targets < 0:
            raise RlhfspecError(f"keep_targets is {self.keep_targets}; it must be >= 0 (0: keep none).")
        if self.trace_every < 1:
            raise RlhfspecError(f"trace_every is {self.trace_every}; it must be at least 1 (1: every sample keeps a Trace).")
        names = [d.name for d in self.drafters]
        if len(set(names)) != len(names):
            raise RlhfspecError(f"drafters need distinct names; got {names}.")
        s = self.strategy
        if isinstance(s, (Static, Threshold)):
            check_draft_length(s.n)
            if isinstance(s, Threshold) and s.threshold_batch < 1:
                raise RlhfspecError(f"the threshold strategy's batch is {s.threshold_batch}; it must be at least 1.")
            if s.drafter not in names:
                raise RlhfspecError(f"the {type(s).__name__.lower()} strategy drafts with {s.drafter!r}, which is not among the drafters {names or '(none)'}.")
        if isinstance(s, Adaptive):
            if not names:
                raise RlhfspecError("the adaptive strategy needs at least one drafter (drafter='ngram', a draft model, or a list).")
            if not 1 <= s.max_n <= MAX_DRAFT_TOKENS:
                raise RlhfspecError(f"the adaptive strategy's max_n is {s.max_n}; it must be between 1 and {MAX_DRAFT_TOKENS}.")

    def fitted(self, max_len: int, samples: int | None = None) -> EngineSpec:
        """This spec with max_len set (if unset) and max_batch capped at `samples`."""
        batch = self.max_batch if samples is None else max(1, min(self.max_batch, samples))
        return replace(self, max_len=self.max_len or max_len, max_batch=batch)

    def build(self, model=None, tokenizer=None, *, drafters: list[Drafter] | None = None, strategy: Strategy | None = None):
        """The GenerationInstance. The model is loaded from `self.model` unless given; drafters and
        strategy are built from the spec unless live ones are handed in (an RL rollout keeps its
        drafters and what its strategy learned from one iteration to the next)."""
        from rlhfspec.engine.instance import GenerationInstance

        return GenerationInstance(**self.parts(model, tokenizer, drafters=drafters, strategy=strategy))

    def parts(self, model=None, tokenizer=None, *, drafters: list[Drafter] | None = None, strategy: Strategy | None = None) -> dict:
        """GenerationInstance's constructor arguments."""
        if self.max_len is None:
            raise RlhfspecError("the engine spec has no max_len; fit it to the prompts first (EngineSpec.fitted).")
        model, tokenizer, drafters, strategy = self.load(model, tokenizer, drafters=drafters, strategy=strategy)
        return dict(model=model, max_batch=self.max_batch, max_len=self.max_len, tokenizer=tokenizer,
                    drafters=drafters, strategy=strategy, batch_invariant=self.batch_invariant, keep_targets=self.keep_targets,
                    trace_every=self.trace_every)

    def load(self, model=None, tokenizer=None, *, drafters: list[Drafter] | None = None,
             strategy: Strategy | None = None) -> tuple:
        """(model, tokenizer, drafters, strategy): what an instance runs on, loaded or built from
        the spec where not given (a Ray actor keeps them from one call's instance to the next)."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        if model is None:
            if self.model is None:
                raise RlhfspecError("the engine spec names no model to load, and none was handed to it.")
            from rlhfspec.models.loader import load_model

            model, tokenizer = load_model(self.model, dtype=self.dtype, device=self.device)
        if drafters is None:
            drafters = [d.build(model, tokenizer) for d in self.drafters]
        if strategy is None and self.strategy is not None:
            strategy = self.strategy.build(model, drafters)
        return model, tokenizer, drafters, strategy


def check_draft_length(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise RlhfspecError(f"num_draft_tokens is {n!r}; it must be an integer >= 0.")
    if n > MAX_DRAFT_TOKENS:
        raise RlhfspecError(f"num_draft_tokens is {n}; the maximum is {MAX_DRAFT_TOKENS}.")
