"""Turning prompts (plain text or chat messages) into token ids."""

from __future__ import annotations

from typing import Any

from rlhfspec.errors import RlhfspecError

Messages = list[dict[str, Any]]


def encode_prompt(tokenizer, prompt: str | Messages, chat: bool = True) -> list[int]:
    """Token ids of a prompt; with chat=True (and a chat template) a string is one user message,
    and the assistant turn is opened so the model answers."""
    if not isinstance(prompt, (str, list)):
        raise RlhfspecError(f"a prompt is text or a list of chat messages, not a value of type {type(prompt).__name__} ({str(prompt)[:60]!r}).")
    if isinstance(prompt, str) and not prompt.strip():
        raise RlhfspecError("the prompt is empty; a chat template would wrap it into a prompt the user never wrote.")
    if isinstance(prompt, list) and not any(str(m.get("content", "")).strip() for m in prompt if isinstance(m, dict)):
        raise RlhfspecError("the chat prompt has no message with any content.")
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, str) and not chat:
        raise RlhfspecError("the prompt is a list of chat messages, but chat=False (generate --raw) encodes a prompt's text "
                            "as it is; give plain-text prompts, or apply the chat template (no --raw).")
    if not isinstance(prompt, str):
        raise RlhfspecError("the prompt is a list of chat messages, but the tokenizer has no chat template to turn them into "
                            "text; give plain-text prompts, or a model whose tokenizer has a chat template.")
    return tokenizer(prompt)["input_ids"]
