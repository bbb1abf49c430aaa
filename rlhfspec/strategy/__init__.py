"""Pure decision logic (no tensors): which drafter and how many draft tokens at each step."""

from rlhfspec.strategy.base import Decision, StaticStrategy, StepRecord, Strategy, Workload

__all__ = ["Decision", "StaticStrategy", "StepRecord", "Strategy", "Workload"]
