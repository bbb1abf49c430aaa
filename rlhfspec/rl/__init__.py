"""The RL loop: experience making, advantages, losses, trainer, checkpoints."""
