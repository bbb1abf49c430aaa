"""Linear layers as plain callables: `F.linear` for training, a prepacked kernel for CPU inference.

MKL's and oneDNN's GEMMs repack the weight matrix on every call; with the weight streamed from
DRAM at small batch sizes that repacking costs as much as the product itself. Packing once
(MKL's sgemm_pack for float32, oneDNN's blocked layout for bfloat16) cuts the step time of
small-batch decoding on this project's reference CPU (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

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


def projection(weight: torch.Tensor, bias: torch.Tensor | None, inference: bool) -> Projection:
    """x -> x @ weight.T + bias; for inference on CPU through a packed copy of weight when a kernel is verified."""
    kernel = packed_kernel(weight) if inference else None
    if kernel is None:
        return lambda x: F.linear(x, weight, bias)
    pack, apply = kernel
    packed = pack(weight.detach())
    return lambda x: apply(x, packed, weight, bias)


def _mkl_pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(w, _PACK_HINT)


def _mkl_apply(x: torch.Tensor, packed: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # The last argument is the batch size the packed kernel runs for; passing x's row count
    # keeps every call on the packed path (the packed layout itself does not depend on it).
    return torch.ops.mkl._mkl_linear(x, packed, w, b, x.numel() // x.shape[-1])


def _dnnl_pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, _PACK_HINT)


def _dnnl_apply(x: torch.Tensor, packed: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


_KERNELS = {torch.float32: (_mkl_pack, _mkl_apply), torch.bfloat16: (_dnnl_pack, _dnnl_apply)}
_verified: dict[tuple, bool] = {}


def packed_kernel(weight: torch.Tensor):
    """(pack, apply) for this weight's dtype and shape on CPU, or None where F.linear is the path.

    Each (dtype, shape) is checked once against F.linear at several batch sizes; a kernel that
    is missing or disagrees is never used.
    """
    if weight.device.type != "cpu" or weight.dtype not in _KERNELS:
        return None
    key = (weight.dtype, tuple(weight.shape))
    if key not in _verified:
        _verified[key] = _agrees(weight.dtype, tuple(weight.shape), *_KERNELS[weight.dtype])
    return _KERNELS[weight.dtype] if _verified[key] else None


def _agrees(dtype: torch.dtype, shape: tuple[int, int], pack, apply) -> bool:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen).to(dtype)
    b = torch.randn(shape[0], generator=gen).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    try:
        packed = pack(w)
        for rows in (1, 3, 16, 67):
            x = torch.randn(rows, shape[1], generator=gen).to(dtype)
            ref = F.linear(x.double(), w.double(), b.double())
            got = apply(x, packed, w, b).double()
            if not torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max().item()):
                return False
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True
