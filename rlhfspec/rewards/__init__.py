"""Reward functions (TRL's signature) and reward models."""
