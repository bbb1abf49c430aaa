"""Reward functions the RL tests load by 'module:function' name."""


def digit_count(prompts, completions, **_):
    """Rewards completions for the digits they hold: a dense signal a tiny random model can learn.
    Chat completions arrive as [{"role": "assistant", "content": ...}], as TRL passes them."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / 10 for t in texts]


def explode(prompts, completions, **_):
    """A reward function with a bug."""
    raise ValueError("cannot score this")


def per_prompt(prompts, completions, **_):
    """A score that reads only the prompt: every sample of a group gets the same one."""
    return [float(len(str(p)) % 3) for p in prompts]
