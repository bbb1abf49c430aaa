"""Drafters propose tokens for speculative decoding; the policy verifies them."""

from rlhfspec.engine.drafters.base import Drafter, Proposal
from rlhfspec.engine.drafters.draft_model import DraftModelDrafter
from rlhfspec.engine.drafters.eagle import EagleDrafter
from rlhfspec.engine.drafters.ngram import NgramDrafter

__all__ = ["DraftModelDrafter", "Drafter", "EagleDrafter", "NgramDrafter", "Proposal"]
