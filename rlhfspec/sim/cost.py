"""What a simulated step costs: a measured step-time table, or the roofline of an accelerator.

Either source answers the same three questions (a verification forward, drafting, a prefill)
and gives the profile the engine's selector would start from (`profile`), in the selector's own
`CostModel` form: the engine profiles its hardware once and learns corrections online, and the
simulated selector does the same against the simulated hardware.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlhfspec.errors import RlhfspecError
from rlhfspec.sim.hardware import Roofline, read_json
from rlhfspec.strategy.cost_model import CostModel, Table

PROFILE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PROFILE_QS = (1, 2, 3, 5, 9, 17)
# Host-side cost of the n-gram drafter per row and draft token where nothing measured it:
# the selector's own prior for an unprofiled drafter (strategy/cost_model.py).
NGRAM_SECONDS_PER_ROW_TOKEN = 2e-5


class StepCost:
    """Seconds of the parts of a step. `context` is the mean number of cached tokens per row."""

    kv_bytes_per_token: float = 0.0

    def verify(self, batch: int, q: float, context: float) -> float:
        """A forward of q (mean) new tokens per row over `batch` rows."""
        raise NotImplementedError

    def draft(self, drafter: str, batch: int, n: int, context: float) -> float:
        """`drafter` proposing n tokens for `batch` rows (0 when either is 0)."""
        raise NotImplementedError

    def prefill(self, tokens: int, rows: int) -> float:
        """One packed forward of `tokens` new tokens over `rows` empty rows."""
        return self.verify(rows, tokens / rows, 0.0) if rows else 0.0

    def profile(self, max_batch: int, max_n: int) -> CostModel:
        """The cost model the engine's selector would start from on this hardware."""
        raise NotImplementedError


@dataclass
class TableCost(StepCost):
    """A measured step-time table T(B, q) (the engine's profile, or `bench steps` on a device),
    interpolated as the selector interpolates it; drafting from the table's draft rows, or per
    row-token for the n-gram drafter. Step times here do not depend on the context length."""

    verify_table: Table
    drafts: dict[str, Table] = field(default_factory=dict)
    ngram_seconds_per_row_token: float = NGRAM_SECONDS_PER_ROW_TOKEN
    kv_bytes_per_token: float = 0.0
    source: str = "table"
    prefill_seconds_per_token: float | None = None  # measured; else the table's q extrapolated
    selector_profile: CostModel | None = None  # what the engine's selector starts from, where it differs from the table

    def __post_init__(self):
        self._model = CostModel(self.verify_table, self.drafts)

    def prefill(self, tokens: int, rows: int) -> float:
        if self.prefill_seconds_per_token is None:
            return super().prefill(tokens, rows)
        return tokens * self.prefill_seconds_per_token

    def verify(self, batch: int, q: float, context: float) -> float:
        return self._model.verify(batch, q)

    def draft(self, drafter: str, batch: int, n: int, context: float) -> float:
        if n <= 0 or batch <= 0:
            return 0.0
        if drafter in self.drafts:
            return self._model.draft(drafter, batch, n)
        if drafter == "ngram":
            return self.ngram_seconds_per_row_token * batch * n
        raise RlhfspecError(f"the step-time table {self.source} has no drafting times for drafter {drafter!r}; "
                            f"it has {sorted(self.drafts) or 'none'} (the n-gram drafter needs none).")

    def profile(self, max_batch: int, max_n: int) -> CostModel:
        if self.selector_profile is not None:
            return CostModel.from_json(self.selector_profile.to_json())
        # The engine profiles draft models; the n-gram drafter's cost it learns online.
        return CostModel(self.verify_table, {k: v for k, v in self.drafts.items() if k != "ngram"})

    @classmethod
    def load(cls, path: str | Path, model: str | None = None) -> TableCost:
        """A CostModel JSON (the engine's cached profile: {"verify": [[B, q, s]...], "drafts": {...}}),
        or a `bench steps` JSON ({"models": {name: {"table": [[B, q, s]...]}}}, `model` picks one)."""
        path = Path(path)
        data = read_json(path, "step-time table")
        if "verify" in data:
            m = CostModel.from_json(data)
            per = NGRAM_SECONDS_PER_ROW_TOKEN
            ngram = m.draft_tables.pop("ngram", None)
            if ngram:  # stored as seconds per row-token at (1, 1)
                (b, n), seconds = min(ngram.items())
                per = seconds / (b * n)
            return cls(m.verify_table, m.draft_tables, per, float(data.get("kv_bytes_per_token", 0.0)), str(path))
        models = data.get("models")
        if not isinstance(models, dict) or not models:
            raise RlhfspecError(f"step-time table {path} has neither a 'verify' table nor 'models' from bench steps.")
        if model is None and len(models) > 1:
            raise RlhfspecError(f"step-time table {path} holds {', '.join(models)}; name one with --table-model.")
        name = model or next(iter(models))
        if name not in models:
            raise RlhfspecError(f"step-time table {path} has no model {name!r}; it has {', '.join(models)}.")
        entry = models[name]
        table = {(int(b), int(q)): float(t) for b, q, t in entry["table"]}
        return cls(table, {}, kv_bytes_per_token=float(entry.get("kv_bytes_per_token", 0.0)), source=f"{path}:{name}")

    def to_json(self) -> dict:
        data = CostModel(self.verify_table, self.drafts).to_json()
        data["drafts"]["ngram"] = [[1, 1, self.ngram_seconds_per_row_token]]
        data["kv_bytes_per_token"] = self.kv_bytes_per_token
        return data


@dataclass
class RooflineCost(StepCost):
    """The policy's roofline for verification and prefill; drafting with a draft model's roofline
    (n sequential one-token forwards on the same GPUs), or the n-gram drafter's host cost."""

    policy: Roofline
    draft_models: dict[str, Roofline] = field(default_factory=dict)
    ngram_seconds_per_row_token: float = NGRAM_SECONDS_PER_ROW_TOKEN
    profile_context: int = 512  # the context the engine's profile measures at (`bench steps`' default)

    @property
    def kv_bytes_per_token(self) -> float:
        return self.policy.shape.kv_bytes_per_token + sum(d.shape.kv_bytes_per_token for d in self.draft_models.values())

    def verify(self, batch: int, q: float, context: float) -> float:
        return self.policy.forward(batch, q, context)

    def draft(self, drafter: str, batch: int, n: int, context: float) -> float:
        if n <= 0 or batch <= 0:
            return 0.0
        if drafter in self.draft_models:
            return n * self.draft_models[drafter].forward(batch, 1, context)
        if drafter == "ngram":
            return self.ngram_seconds_per_row_token * batch * n
        raise RlhfspecError(f"drafter {drafter!r} has no cost model; name a draft model for it (--draft-model) or use ngram.")

    def prefill(self, tokens: int, rows: int) -> float:
        # The prompt attends to itself: about half its length on average.
        return self.policy.forward(1, tokens, 0.0) if rows else 0.0

    def profile(self, max_batch: int, max_n: int) -> CostModel:
        batches = [b for b in PROFILE_BATCHES if b < max_batch] + [max_batch]
        qs = sorted({q for q in PROFILE_QS if q <= max_n + 1} | {max_n + 1})
        c = self.profile_context
        verify = {(b, q): self.policy.forward(b, q, c) for b in batches for q in qs}
        drafts = {name: {(b, n): n * d.forward(b, 1, c) for b in batches for n in (1, 8)} for name, d in self.draft_models.items()}
        return CostModel(verify, drafts)
