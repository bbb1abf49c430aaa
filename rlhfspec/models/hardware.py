"""What the running machine offers, read once: its CPU model name, vendor and whether it computes bfloat16
natively; and what this process holds in memory."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from rlhfspec.errors import RlhfspecError


@functools.cache
def _first_cpu() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (empty where there is no such file), read once."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is no such file)."""
    return frozenset(_first_cpu().get("flags", "").split())


def cpu_model() -> str:
    return _first_cpu().get("model name") or platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """'AuthenticAMD', 'GenuineIntel', ... ('' where /proc/cpuinfo does not say)."""
    return _first_cpu().get("vendor_id", "")


def native_bf16() -> bool:
    """True where bfloat16 matrix products run in hardware (AVX512-BF16 or AMX) and torch's
    kernels are allowed to use it (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA may hold them back)."""
    if not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_device(device: str, setting: str = "device") -> str:
    """`device` resolved ("auto": a CUDA GPU when torch sees one, else the CPU), or one sentence,
    naming `setting`, on why this process cannot use it."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if device != "cpu" and (kind != "cuda" or (index and not index.isdigit())):
        raise RlhfspecError(f"{setting} {device!r} is not auto, cpu, cuda or cuda:N.")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RlhfspecError(f"{setting} is {device!r}, but this torch ({torch.__version__}) sees no CUDA GPU; "
                                "use cpu (or auto, which picks a GPU only where there is one).")
        if index and int(index) >= torch.cuda.device_count():
            raise RlhfspecError(f"{setting} is {device!r}, but torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0.")
    return device


def describe() -> str:
    """CPU model, torch's kernel capability and bf16 support, for benchmark headers."""
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()} (kernels {cap}, bf16 {'native' if native_bf16() else 'emulated'})"


def peak_resident() -> int:
    """This process's peak resident set since it started or the last reset (VmHWM), bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def peak_memory_mb(device: torch.device) -> float | None:
    """The most memory this process has held: torch's peak allocation on a GPU, the kernel's peak
    resident set on the CPU; MB, None where the system does not say."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return peak_resident() / 2**20
    except (OSError, StopIteration):
        return None
