"""A picklable recipe for one generation instance, so a Ray actor (or a test) can build it anywhere."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhfspec.rollout.local import LocalInstance


@dataclass
class InstanceSpec:
    model: str  # what load_model reads: "default", a Hugging Face directory or a .gguf file
    max_batch: int = 64
    max_len: int = 512
    dtype: str | None = None
    threads: int | None = None
    drafters: list[str] = field(default_factory=list)  # "ngram" or draft model paths
    strategy: str | None = None  # None (plain), "static:<drafter>:<n>", "threshold:<drafter>:<n>:<max batch>" or "adaptive"
    batch_invariant: bool = True  # bitwise the same rows whatever the batch (see models/invariance.py)

    def build(self, index: int, model=None, tokenizer=None) -> LocalInstance:
        """The instance, loading the model unless one is given (in-process instances share it)."""
        import torch

        from rlhfspec.engine.drafters import DraftModelDrafter, NgramDrafter
        from rlhfspec.engine.generate import adaptive_strategy
        from rlhfspec.models.loader import load_model
        from rlhfspec.strategy.base import StaticStrategy
        from rlhfspec.strategy.selector import ThresholdStrategy

        if self.threads:
            torch.set_num_threads(self.threads)
        if model is None:
            model, tokenizer = load_model(self.model, dtype=self.dtype)
        drafters = [NgramDrafter() if d == "ngram" else DraftModelDrafter.load(d, model, policy_tokenizer=tokenizer) for d in self.drafters]
        strategy = None
        if self.strategy == "adaptive":
            strategy = adaptive_strategy(model, drafters)
        elif self.strategy and self.strategy.startswith("threshold:"):
            _, name, n, batch = self.strategy.split(":")
            strategy = ThresholdStrategy(name, int(n), int(batch))
        elif self.strategy:
            _, name, n = self.strategy.split(":")
            strategy = StaticStrategy(name, int(n))
        return LocalInstance(index, model, self.max_batch, self.max_len, tokenizer=tokenizer, drafters=drafters,
                             strategy=strategy, threads=self.threads, batch_invariant=self.batch_invariant)
