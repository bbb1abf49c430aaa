"""A reward model: a Hugging Face *ForSequenceClassification checkpoint of a Llama-family model."""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfspec.errors import RlhfspecError
from rlhfspec.models.checkpoint import from_hf, read_hf_config, read_hf_tensors
from rlhfspec.models.config import ModelConfig
from rlhfspec.models.llama import Transformer
from rlhfspec.models.batch import hidden_states, padded_batch


class RewardModel:
    """Scores prompt+completion with the classification head at the last token (num_labels must be 1).

    Callable with TRL's reward-function signature, so it sits in a RewardSet like any function.
    """

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
        from transformers import AutoTokenizer

        path = Path(path)
        hf = read_hf_config(path)
        tensors = read_hf_tensors(path)
        if "score.weight" not in tensors:
            raise RlhfspecError(f"{path} has no score.weight; a reward model must be a *ForSequenceClassification checkpoint.")
        score = tensors.pop("score.weight")
        if score.shape[0] != 1:
            raise RlhfspecError(f"{path} has {score.shape[0]} labels; a reward model needs exactly one.")
        backbone = dict(hf, tie_word_embeddings=True)  # the classification checkpoint has no LM head
        config = ModelConfig.from_hf(backbone, source=str(path / "config.json"))
        model = Transformer(config, dtype=dtype, device="meta")
        state = {k: v.to(dtype=dtype, device=device) for k, v in from_hf(config, tensors, str(path)).items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.rope_cos = torch.empty(0, dtype=dtype, device=device)
        model.rope_sin = torch.empty(0, dtype=dtype, device=device)
        self.model = model.eval().requires_grad_(False)
        self.score_weight = score.to(dtype=dtype, device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.__name__ = f"reward_model[{path.name}]"

    @torch.no_grad()
    def scores(self, token_ids: list[list[int]]) -> list[float]:
        hidden = hidden_states(self.model, *padded_batch(token_ids))
        last = torch.tensor([len(t) - 1 for t in token_ids], device=hidden.device)
        h = self.model.normed(hidden[torch.arange(len(token_ids), device=hidden.device), last])
        return (h @ self.score_weight.T).squeeze(-1).float().tolist()

    def encode(self, prompt, completion: str) -> list[int]:
        if isinstance(prompt, list) and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(str(prompt) + completion)["input_ids"]

    def __call__(self, prompts, completions, completion_ids=None, **_) -> list[float]:
        return self.scores([self.encode(p, c) for p, c in zip(prompts, completions)])
