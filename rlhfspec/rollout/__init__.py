"""Generation over K >= 1 instances: the one driver (Coordinator), its backends, the rebalancer,
`generate` and the RL generation stage."""

from rlhfspec.rollout.generate import Generation, Placement, generate, run_generation
from rlhfspec.rollout.rollout import Rollout

__all__ = ["Generation", "Placement", "Rollout", "generate", "run_generation"]
