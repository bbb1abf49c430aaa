"""The inference projections' kernels: each computes x @ w.T (+ b) on this machine, and which one a
weight gets follows the CPU's vendor and is remembered per candidate order."""

import pytest
import torch

import rlhfspec.models.linear as linear
from rlhfspec.models.invariance import Verdicts


@pytest.mark.parametrize("kernel", ["mkl-packed", "onednn-packed"])
@pytest.mark.parametrize("bias", [False, True])
def test_every_float32_kernel_agrees_with_a_float64_product(kernel, bias):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    ok, _ = linear._correct(linear.KERNELS[kernel], w, b, gen)
    assert ok


@pytest.mark.parametrize("kernel", ["mkl-packed-f32", "onednn-packed-f32"])
def test_the_float32_copies_of_a_bfloat16_weight_agree_with_a_float64_product(kernel):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 80, generator=gen).bfloat16()
    ok, _ = linear._correct(linear.KERNELS[kernel], w, torch.randn(96, generator=gen).bfloat16(), gen)
    assert ok


def test_onednn_comes_first_for_float32_on_amd_and_mkl_elsewhere(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(linear, "cpu_vendor", lambda: "AuthenticAMD")
    assert linear.candidates(torch.float32, cpu)[0] is linear.DNNL
    monkeypatch.setattr(linear, "cpu_vendor", lambda: "GenuineIntel")
    assert linear.candidates(torch.float32, cpu)[0] is linear.MKL
    assert linear.candidates(torch.float32, torch.device("meta")) == [linear.LINEAR]


def test_a_verdict_stored_under_one_kernel_order_is_not_reused_under_another(monkeypatch, tmp_path):
    """A machine's verdicts outlive code changes: one made when MKL came first must not choose the
    kernel once oneDNN comes first."""
    monkeypatch.setattr(linear, "VERDICTS", Verdicts(tmp_path / "kernels.json"))
    chosen = {}
    for vendor in ("GenuineIntel", "AuthenticAMD", "GenuineIntel"):
        monkeypatch.setattr(linear, "cpu_vendor", lambda vendor=vendor: vendor)
        choice = linear.choose((48, 32), False, torch.float32, torch.device("cpu"), invariant=True)
        assert chosen.setdefault(vendor, choice.kernel) is choice.kernel
        assert choice.plan is not None and choice.plan.tile >= 1
    assert chosen == {"GenuineIntel": linear.MKL, "AuthenticAMD": linear.DNNL}
