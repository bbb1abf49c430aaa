"""What every benchmark shares: timing medians, machine description, memory bandwidth, RESULTS.md sections."""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from rlhfspec.models.hardware import describe, peak_resident

RESULTS = Path("benchmarks") / "RESULTS.md"


def machine() -> str:
    """One line naming the CPU (its kernel capability and bf16 support), core count and torch threads, and the GPU if any."""
    desc = f"{describe()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def timed(fn: Callable[[], object], device: str = "cpu") -> float:
    """Wall seconds of one call (synchronising the GPU when there is one)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


class PeakMemory:
    """The most memory a block of code took above what the process held when it began, in MB: on a
    GPU torch's peak allocation; on the CPU the kernel's peak resident set (VmHWM, reset on entry
    through /proc/self/clear_refs), or where that cannot be reset the resident set sampled every
    `every` seconds from a thread (a peak shorter than that can be missed).
    `with PeakMemory(device) as m: ...; m.mb`."""

    def __init__(self, device: torch.device | str = "cpu", every: float = 0.005):
        self.device, self.every, self.mb = torch.device(device), every, 0.0
        self.how = "torch's peak GPU allocation" if self.device.type == "cuda" else "the kernel's peak resident set"

    def __enter__(self) -> PeakMemory:
        import threading

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start, self.thread = _resident(), None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak resident set starts again from the current one
        except OSError:
            self.how = f"the resident set sampled every {self.every * 1e3:g} ms"
            self.peak, self.done = 0, threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(self.every):
            self.peak = max(self.peak, _resident())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.thread is None:
            peak = peak_resident()
        else:
            self.done.set()
            self.thread.join()
            peak = max(self.peak, _resident())
        self.mb = max(0, peak - self.start) / 2**20


def _resident() -> int:
    """This process's resident set, bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def memory_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s for summing a buffer far larger than the caches (median of repeats)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()
    return x.numel() * 4 / median([timed(x.sum) for _ in range(repeats)])


def results_file(record: bool) -> Path:
    """benchmarks/RESULTS.md when recording (--record), else a scratch RESULTS.md in a new
    temporary directory, so a quick run on another machine never replaces the committed tables."""
    return RESULTS if record else Path(tempfile.mkdtemp(prefix="rlhfspec-bench-")) / "RESULTS.md"


def write_section(name: str, body: str, path: Path = RESULTS) -> str:
    """Replace (or append) the section between <!-- bench:NAME --> markers in the results file at
    `path`; returns the body with a line saying where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmark results\n\nEvery table below was written by the command shown above it.\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    where = f"recorded in {path}" if path == RESULTS else f"not recorded (pass --record to write it into {RESULTS}); plots in {path.parent}"
    return f"{body.rstrip()}\n\n({where})"


def write_json(path: str | os.PathLike | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))


def bench_command(name: str, config_path, iterations: int, overrides=None, json_path=None, record: bool = False) -> str:
    """The command line that reproduces a run-based bench (`rlhfspec bench NAME ...`), as its section shows it."""
    cmd = f"rlhfspec bench {name}" + (f" --config {config_path}" if config_path else "") + f" --iterations {iterations}"
    return cmd + "".join(f" {o}" for o in overrides or []) + (f" --json {json_path}" if json_path else "") + (" --record" if record else "")
