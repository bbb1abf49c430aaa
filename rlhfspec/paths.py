"""Where rlhfspec keeps what it derives once per machine: the dequantized default model, kernel
verdicts, forward-time profiles, the default draft."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$RLHFSPEC_CACHE, else ~/.cache/rlhfspec."""
    return Path(os.environ.get("RLHFSPEC_CACHE", Path.home() / ".cache" / "rlhfspec"))


def default_draft_path() -> Path:
    """Where `rlhfspec distill-draft`'s default run puts the distilled default draft, and where the
    drafter "draft" looks for it."""
    return default_cache_dir() / "drafts" / "smollm2-135m-l2-h256-v8192"


def default_eagle_path() -> Path:
    """Where `rlhfspec distill-draft --kind eagle`'s default run puts the default eagle head, and
    where the drafter "eagle" looks for it."""
    return default_cache_dir() / "drafts" / "smollm2-135m-eagle-v8192"
