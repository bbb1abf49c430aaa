"""rlhfspec: RLHF whose generation stage runs on a batched engine with lossless speculative decoding."""

from rlhfspec.engine.generate import generate
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.sequence import GenerationOutput
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.checkpoint import save_pretrained
from rlhfspec.models.loader import load_model

__all__ = ["GenerationOutput", "RlhfspecError", "SamplingParams", "generate", "load_model", "save_pretrained"]
