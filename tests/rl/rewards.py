"""Reward functions the RL tests load by 'module:function' name."""


def digit_count(prompts, completions, **_):
    """Rewards completions for the digits they hold: a dense signal a tiny random model can learn."""
    return [sum(ch.isdigit() for ch in c) / 10 for c in completions]


def explode(prompts, completions, **_):
    """A reward function with a bug."""
    raise ValueError("cannot score this")
