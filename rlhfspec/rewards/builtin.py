"""Built-in reward functions with TRL's signature: fn(prompts, completions, completion_ids, **columns) -> list[float | None]."""

from __future__ import annotations

import re

_ANSWER = re.compile(r"answer\s*(?:is)?\s*[:=]?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _text(completion) -> str:
    """A completion as text (TRL passes chat completions as [{'role': 'assistant', 'content': ...}])."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def parse_answer(text: str) -> float | None:
    """The number after the last 'Answer:' (or '####'), else the last number in the text."""
    text = text.replace("####", "Answer:")
    found = _ANSWER.findall(text)
    if not found:
        found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def arithmetic_correct(prompts, completions, completion_ids=None, answer=None, **_) -> list[float | None]:
    """1 when the completion's final answer equals the row's `answer`, else 0 (None when a row has no answer)."""
    if answer is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for c, a in zip(completions, answer):
        if a is None:
            out.append(None)
            continue
        got = parse_answer(_text(c))
        out.append(1.0 if got is not None and abs(got - float(a)) < 1e-6 else 0.0)
    return out


def answer_format(prompts, completions, completion_ids=None, **_) -> list[float]:
    """0.2 for ending with a line 'Answer: <number>', the format the arithmetic prompts ask for."""
    return [0.2 if re.search(r"answer\s*:\s*-?\d[\d,]*(\.\d+)?\s*\.?\s*$", _text(c).strip(), re.IGNORECASE) else 0.0 for c in completions]


def answer_closeness(prompts, completions, completion_ids=None, answer=None, **_) -> list[float | None]:
    """Partial credit 0.3 * max(0, 1 - |got - answer| / max(1, |answer|)) for near misses."""
    if answer is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for c, a in zip(completions, answer):
        got = parse_answer(_text(c))
        if a is None or got is None:
            out.append(None if a is None else 0.0)
            continue
        out.append(0.3 * max(0.0, 1.0 - abs(got - float(a)) / max(1.0, abs(float(a)))))
    return out


def gsm8k_correct(prompts, completions, completion_ids=None, answer=None, **_) -> list[float | None]:
    """GSM8K-style: the dataset's answer ends with '#### <number>'; 1 when the completion's answer matches."""
    if answer is None:
        return [None] * len(completions)
    numbers = [parse_answer(str(a)) for a in answer]
    return arithmetic_correct(prompts, completions, completion_ids, answer=numbers)


BUILTIN = {f.__name__: f for f in (arithmetic_correct, answer_format, answer_closeness, gsm8k_correct)}
