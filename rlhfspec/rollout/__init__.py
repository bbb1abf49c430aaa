"""The generation stage of an RL iteration: prompts x samples over one or more generation instances."""

from rlhfspec.rollout.rollout import Rollout, RolloutResult

__all__ = ["Rollout", "RolloutResult"]
