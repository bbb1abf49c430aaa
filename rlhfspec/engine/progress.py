"""A progress bar over finished samples that shows tokens/s (and acceptance when speculating)."""

from __future__ import annotations

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int, enabled: bool, desc: str = "generate"):
        self.bar = tqdm(total=total, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True, leave=False)
        self._last = 0.0

    def update(self, finished: int, tokens: int, elapsed: float, acceptance: float | None = None) -> None:
        if self.bar.disable:
            return
        self.bar.update(finished)
        if elapsed - self._last > 0.5:
            post = {"tok/s": f"{tokens / max(elapsed, 1e-9):.1f}"}
            if acceptance is not None:
                post["accept"] = f"{acceptance:.0%}"
            self.bar.set_postfix(post, refresh=False)
            self._last = elapsed

    def close(self) -> None:
        self.bar.close()
