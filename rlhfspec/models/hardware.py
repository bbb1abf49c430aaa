"""What the running CPU offers, read once: its model name and whether it computes bfloat16 natively."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16() -> bool:
    """True where bfloat16 matrix products run in hardware (AVX512-BF16 or AMX) and torch's
    kernels are allowed to use it (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA may hold them back)."""
    if not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def describe() -> str:
    """CPU model, torch's kernel capability and bf16 support, for benchmark headers."""
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()} (kernels {cap}, bf16 {'native' if native_bf16() else 'emulated'})"


def release_memory() -> None:
    """Give freed heap pages back to the OS: glibc keeps them, so processes that take turns with
    large transient buffers (several trainers, an actor loading new weights) would add up their peaks."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
