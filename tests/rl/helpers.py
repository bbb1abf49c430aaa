"""A tiny policy with a word-level tokenizer that covers the arithmetic prompts, for RL tests."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import tiny_hf_model

WORDS = ["What", "is", "?", "Think", "step", "by", ",", "then", "give", "the", "final", "answer", "on", "last", "line",
         "as", "'", "Answer", ":", "<", "number", ">", ".", "+", "-", "*", "with", "just"] + [str(d) for d in range(10)]


# Turns in order, then an open assistant turn: enough for chat-messages datasets.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} . {% endfor %}{% if add_generation_prompt %}Answer :{% endif %}"


def tiny_policy_dir(path: Path, seed: int = 0) -> Path:
    """A tiny Llama checkpoint plus tokenizer files, as `rlhfspec train` loads them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    model = tiny_hf_model("llama", seed=seed, vocab_size=len(vocab) + 4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def rl_config(tmp_path: Path, policy: Path, **overrides):
    """A small run of the tiny policy: 2 prompts per iteration, no TensorBoard, no speculation,
    then `overrides` ({"section.key": value})."""
    from rlhfspec.rl.config_files import load_config

    settings = {"model.policy": policy, "run.output_dir": tmp_path / "run", "data.prompts_per_iteration": 2,
                "run.tensorboard": "false", "generation.speculative": "false", **overrides}
    return load_config(None, [a for k, v in settings.items() for a in (f"--{k}", str(v))])
