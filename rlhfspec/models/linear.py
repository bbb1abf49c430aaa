"""Linear layers as plain callables: `F.linear` for training, a verified kernel for inference.

MKL's and oneDNN's GEMMs repack the weight matrix on every call; with the weight streamed from
DRAM at small batch sizes that repacking costs as much as the product itself. Packing once
(MKL's sgemm_pack for float32, oneDNN's blocked layout for bfloat16) cuts the step time of
small-batch decoding (see benchmarks/RESULTS.md). On CPUs without native bfloat16, oneDNN's
bf16 path is several times slower than float32, so there a bf16 weight is computed through a
packed float32 copy of it (bf16 products are exact in float32; the result is rounded to bf16).
On AMD CPUs oneDNN's float32 kernels come before MKL's (see `candidates`).

For batch-invariant generation each kernel is used only with the call sizes `plan_rows`
verified on this machine (see invariance.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rlhfspec.models.hardware import cpu_vendor, native_bf16
from rlhfspec.models.invariance import VERDICTS, RowPlan, apply_rows, cancelling_probe, plan_rows

Projection = Callable[[torch.Tensor], torch.Tensor]
_PACK_HINT = 16  # batch size the packed layout is tuned for; it serves every batch size


class Linear(nn.Module):
    """Holds a weight [out, in] and optional bias; the model turns it into a `Projection`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True, slots=True)
class Kernel:
    """A way to compute x @ w.T + b: `pack` prepares the weight once, `apply(x, packed, w, b)` runs it."""

    name: str
    pack: Callable[[torch.Tensor], object]
    apply: Callable[[torch.Tensor, object, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _mkl_apply(x, packed, w, b):
    # The last argument is the batch size the packed kernel runs for; passing x's row count
    # keeps every call on the packed path (the packed layout itself does not depend on it).
    return torch.ops.mkl._mkl_linear(x, packed, w, b, x.numel() // x.shape[-1])


def _mkl_f32_pack(w):
    w32 = w.float()
    return w32, torch.ops.mkl._mkl_reorder_linear_weight(w32, _PACK_HINT)


def _mkl_f32_apply(x, packed, w, b):
    w32, p = packed
    return torch.ops.mkl._mkl_linear(x.float(), p, w32, None if b is None else b.float(), x.numel() // x.shape[-1]).to(x.dtype)


def _dnnl_pack(w):
    return torch.ops.mkldnn._reorder_linear_weight(w, _PACK_HINT)


def _dnnl_apply(x, packed, w, b):
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def _dnnl_f32_apply(x, packed, w, b):
    return _dnnl_apply(x.float(), packed, w, None if b is None else b.float()).to(x.dtype)


MKL = Kernel("mkl-packed", lambda w: torch.ops.mkl._mkl_reorder_linear_weight(w, _PACK_HINT), _mkl_apply)
MKL_F32 = Kernel("mkl-packed-f32", _mkl_f32_pack, _mkl_f32_apply)
DNNL = Kernel("onednn-packed", _dnnl_pack, _dnnl_apply)
DNNL_F32 = Kernel("onednn-packed-f32", lambda w: _dnnl_pack(w.float()), _dnnl_f32_apply)
LINEAR = Kernel("F.linear", lambda w: None, lambda x, packed, w, b: F.linear(x, w, b))


def candidates(dtype: torch.dtype, device: torch.device) -> list[Kernel]:
    """Kernels to try for this dtype and device, fastest first on the CPUs measured (RESULTS.md).

    A fixed order rather than a timing race: every process on a machine must pick the same
    kernel, or two instances would round differently. On AMD CPUs MKL's float32 GEMM takes
    generic code paths (measured on an AMD EPYC: 9-21 GFLOP/s at 8 rows where oneDNN's packed
    kernel runs 34-45, and 1.2-1.8x oneDNN's time at 64 rows), so oneDNN comes first there.
    """
    if device.type != "cpu":
        return [LINEAR]
    amd = cpu_vendor() == "AuthenticAMD"
    if dtype == torch.float32:
        return [DNNL, MKL, LINEAR] if amd else [MKL, LINEAR]
    if dtype == torch.bfloat16:
        if native_bf16():
            return [DNNL, LINEAR, MKL_F32]
        return [DNNL_F32, MKL_F32, DNNL, LINEAR] if amd else [MKL_F32, DNNL, LINEAR]
    return [LINEAR]


@dataclass(frozen=True, slots=True)
class KernelChoice:
    kernel: Kernel
    plan: RowPlan | None  # None: no invariance asked for


KERNELS = {k.name: k for k in (MKL, MKL_F32, DNNL, DNNL_F32, LINEAR)}


def choose(shape: tuple[int, int], bias: bool, dtype: torch.dtype, device: torch.device, invariant: bool) -> KernelChoice:
    """The first candidate kernel that computes x @ w.T (+ b) correctly for this weight shape and,
    when asked, has verified batch-invariant call sizes (remembered per machine)."""
    names = ",".join(k.name for k in candidates(dtype, device))
    key = f"linear {shape[0]}x{shape[1]} bias={bias} {dtype} {device} invariant={invariant} from {names}"
    verdict = VERDICTS.get(key, lambda: _verdict(shape, bias, dtype, device, invariant))
    return KernelChoice(KERNELS[verdict["kernel"]], None if verdict["sizes"] is None else RowPlan(tuple(verdict["sizes"])))


def _verdict(shape, bias, dtype, device, invariant) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    b = torch.randn(shape[0], generator=gen).to(dtype=dtype, device=device) if bias else None
    correct = []
    for k in candidates(dtype, device):
        ok, packed = _correct(k, w, b, gen)
        if not ok:
            continue
        if not invariant:
            return {"kernel": k.name, "sizes": None}
        # Every call runs two probes side by side: the cancelling one shows reduction orders that
        # round to different bf16 outputs; plain random rows show orders that move only float32's
        # last bit, which the cancelling one's large terms can hide (seen: MKL's AVX2 kernel for a
        # call's remainder row agreed with the tile on one probe and not on plain random rows).
        probe, pw = cancelling_probe(64, w, gen)
        pp = k.pack(pw)
        plain = torch.randn(64, shape[1], generator=gen).to(dtype=dtype, device=device)
        n = shape[1]
        plan = plan_rows(lambda x: torch.cat([k.apply(x[:, :n].contiguous(), pp, pw, b), k.apply(x[:, n:].contiguous(), packed, w, b)], 1),
                         torch.cat([probe, plain], 1))
        if plan is not None:
            return {"kernel": k.name, "sizes": list(plan.sizes)}
        correct.append(k.name)
    # One row per call: slow, but a single call shape serves every row.
    return {"kernel": correct[0] if correct else LINEAR.name, "sizes": [1]}


def _correct(k: Kernel, w: torch.Tensor, b: torch.Tensor | None, gen: torch.Generator) -> tuple[bool, object]:
    """(whether k agrees with a float64 product at several batch sizes, the packed weight)."""
    tol = 1e-4 if w.dtype == torch.float32 else 5e-2
    try:
        packed = k.pack(w)
        for rows in (1, 3, 16, 67):
            x = torch.randn(rows, w.shape[1], generator=gen).to(w.dtype).to(w.device)
            ref = F.linear(x.double(), w.double(), None if b is None else b.double())
            got = k.apply(x, packed, w, b).double()
            if got.shape != ref.shape or not torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max().item()):
                return False, None
    except (RuntimeError, AttributeError, NotImplementedError):
        return False, None
    return True, packed


def projection(weight: torch.Tensor, bias: torch.Tensor | None, inference: bool, invariant: bool = False) -> Projection:
    """x [N, in] -> x @ weight.T + bias [N, out]. For inference through the chosen kernel (packed
    once), and when `invariant`, in calls of the verified sizes so a row's bits never depend on N."""
    if not inference:
        return lambda x: F.linear(x, weight, bias)
    choice = choose(tuple(weight.shape), bias is not None, weight.dtype, weight.device, invariant)
    k, w, b = choice.kernel, weight.detach(), None if bias is None else bias.detach()
    packed = k.pack(w)
    if choice.plan is None:
        return lambda x: k.apply(x, packed, w, b)
    plan, direct = choice.plan, frozenset(choice.plan.sizes)

    def rows(x: torch.Tensor) -> torch.Tensor:
        return k.apply(x, packed, w, b)

    def invariant_projection(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] in direct:  # the hot path: one verified call
            return k.apply(x, packed, w, b)
        return apply_rows(rows, plan, x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)

    return invariant_projection
