"""rlhfspec: RLHF whose generation stage runs on a batched engine with lossless speculative decoding."""

from rlhfspec.rollout.generate import generate
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.sequence import GenerationOutput
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.checkpoint import save_pretrained
from rlhfspec.models.loader import load_model
from rlhfspec.rl.config import Config
from rlhfspec.rl.config_files import load_config
from rlhfspec.rl.trainer import Trainer

__all__ = ["Config", "GenerationOutput", "RlhfspecError", "SamplingParams", "Trainer", "generate", "load_config", "load_model", "save_pretrained"]
