"""When a sample is done: EOS, stop strings, max_new_tokens."""

from __future__ import annotations

from rlhfspec.engine.sequence import Sequence
from rlhfspec.errors import RlhfspecError


class StopChecker:
    """Decides after each emitted token whether a sample has finished, and why."""

    def __init__(self, eos_ids: tuple[int, ...], tokenizer=None):
        self.eos_ids = frozenset(eos_ids)
        self.tokenizer = tokenizer

    def check_params(self, seq: Sequence) -> None:
        if seq.params.stop and self.tokenizer is None:
            raise RlhfspecError(f"sample {seq.sample_id} has stop strings but no tokenizer was given to decode them; pass tokenizer=.")

    def finish_reason(self, seq: Sequence) -> str | None:
        """'stop', 'length' or None, judged on the sample's last token."""
        p = seq.params
        if not p.ignore_eos and seq.tokens[-1] in self.eos_ids:
            return "stop"
        if p.stop and self._hit_stop_string(seq):
            return "stop"
        if len(seq.tokens) >= p.max_new_tokens:
            return "length"
        return None

    def _hit_stop_string(self, seq: Sequence) -> bool:
        # A stop string completed by the newest token lies within the last len(stop) + 1 tokens' text.
        span = max(len(s) for s in seq.params.stop) + 1
        tail = self.tokenizer.decode(seq.tokens[-span:], skip_special_tokens=False)
        return any(s in tail for s in seq.params.stop)
