"""Where rlhfspec keeps what it derives once per machine: the dequantized default model, kernel
verdicts, forward-time profiles, the default draft."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$RLHFSPEC_CACHE, else ~/.cache/rlhfspec."""
    return Path(os.environ.get("RLHFSPEC_CACHE", Path.home() / ".cache" / "rlhfspec"))
