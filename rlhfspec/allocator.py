"""What the C allocator does with freed memory (glibc's mallopt and malloc_trim; elsewhere these
do nothing, and the settings return False). The settings are process-wide, so each process that
wants one sets it once, at its start."""

from __future__ import annotations

import ctypes
import gc
import sys

# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4


def _glibc(name: str):
    """glibc's function `name`, or None (not Linux, or a C library without it: musl has no mallopt)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory(top_pad: int = 256 << 20) -> bool:
    """From now on, serve every allocation from the heap and keep what is freed there for the next
    allocations, giving memory back to the system only when 2 GB lie free at the heap's top.

    By default glibc maps each block of 32 MB or more anew and unmaps it when freed, so every
    training step touches its activations' pages for the first time again: 10.5 million minor page
    faults in six iterations of the default run, 2.3 million with this (and no more after the first
    iterations), peak memory 9.0 GB against 8.3. In the RL loop's driver with idle Ray generation
    actors beside it each fault costs more (this machine is a VM), and the training stage took
    0.82x as long with it (benchmarks/RESULTS.md)."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, top_pad))
    return all([bool(mallopt(param, value)) for param, value in settings])


def fixed_mmap_threshold(size: int = 1 << 20) -> bool:
    """From now on, serve every allocation of `size` bytes or more from its own mapping, returned to
    the system when freed.

    glibc raises that threshold to the size of each large block freed, up to 32 MB, so once the
    teacher's first row logits (tens of MB, freed at once) are gone the next ones come from the heap,
    between the small tensors the teacher keeps; the heap cannot shrink past those, and the process
    grew by about 14 MB per sequence (measured: the 2,560-prompt eagle job ran out of 24 GB in its
    teacher pass). Setting the threshold ends that raising. For one-shot jobs that keep small tensors
    between large freed ones (the distill jobs); the RL loop keeps its freed memory instead
    (keep_freed_memory)."""
    mallopt = _glibc("mallopt")
    return False if mallopt is None else bool(mallopt(M_MMAP_THRESHOLD, size))


def release_memory() -> None:
    """Give freed heap pages back to the OS now: glibc keeps them, so processes that take turns with
    large transient buffers (several trainers, an actor loading new weights) would add up their peaks."""
    gc.collect()
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)
