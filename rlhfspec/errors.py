"""The one exception type users see."""


class RlhfspecError(Exception):
    """Bad input or state a user can act on: one sentence naming the culprit and the fix."""
