"""The kernels' Mish and Mish' (``kernels/activations.py``) element by element in float32, against float64:
mean and largest error in float32 ulps per range of the input, beside PyTorch's own float32 ``F.mish`` and its
backward on the same inputs (the error the whole-model parity tests compare against)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import triton_or_skip

# Ranges of v; Mish' has its root near v = -1.19, where errors are measured in ulps of the range's largest value.
BANDS = [(-12.0, -3.0), (-3.0, -1.3), (-1.3, -1.1), (-1.1, -0.5), (-0.5, 0.0), (0.0, 3.0), (3.0, 14.0)]
POINTS_PER_BAND = 20_000


triton = pytest.importorskip("triton")
tl = triton.language
from cspmirror.kernels.activations import _exp_f32, mish, mish_grad  # noqa: E402  (needs triton)


@triton.jit
def _probe_kernel(v_ptr, mish_ptr, grad_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(v_ptr + offs, mask=mask)
    tl.store(mish_ptr + offs, mish(v, mish_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_ptr + offs, mish_grad(v, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _exp_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, _exp_f32(tl.load(v_ptr + offs, mask=mask)), mask=mask)


def _probe(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' (mish(v), mish'(v)) for a float32 ``v`` [n]."""
    triton_or_skip()
    y, g = torch.empty_like(v), torch.empty_like(v)
    block = 4096
    _probe_kernel[(triton.cdiv(v.numel(), block),)](v, y, g, v.numel(), BLOCK=block)
    return y, g


def _mish_and_grad(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's ``F.mish`` of ``v`` and its derivative, in ``v``'s dtype."""
    v = v.detach().clone().requires_grad_()
    y = F.mish(v)
    (g,) = torch.autograd.grad(y, v, torch.ones_like(y))
    return y.detach(), g


def _ulps(out: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(mean, max) of ``|out - exact|`` in float32 ulps of ``exact``; near a root, where a float32 ulp shrinks to
    nothing, in ulps of 2^-12 of the band's largest ``|exact|`` at least."""
    magnitude = exact.abs().clamp(min=exact.abs().max().item() * 2**-12).float()
    ulp = (torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude).double()
    err = (out.double().cpu() - exact).abs() / ulp
    return err.mean().item(), err.max().item()


@pytest.mark.parametrize("band", BANDS, ids=lambda b: f"{b[0]}..{b[1]}")
def test_mish_and_derivative_as_accurate_as_pytorch(device, band):
    """Mean error at most 1.6x PyTorch's + 0.1 ulp, largest at most 2x PyTorch's + 1 ulp: the accurate fp32
    forms are about as good as PyTorch's everywhere (before them, Mish' had 2-3x PyTorch's error for
    -3 < v < -0.5, where its two terms cancel)."""
    _check_band(device, band)


@pytest.mark.gpu
@pytest.mark.parametrize("band", BANDS, ids=lambda b: f"{b[0]}..{b[1]}")
def test_gpu_mish_and_derivative_as_accurate_as_pytorch(band):
    """The same on the GPU, where the kernels take libdevice's exp and PyTorch CUDA's own."""
    _check_band(torch.device("cuda"), band)


def _check_band(device: torch.device, band: tuple[float, float]) -> None:
    v = torch.linspace(*band, POINTS_PER_BAND, dtype=torch.float32)
    exact = _mish_and_grad(v.double())
    ours = _probe(v.to(device))
    theirs = _mish_and_grad(v.to(device))
    for name, out, ref, torch_out in zip(("mish", "mish'"), ours, exact, theirs, strict=True):
        (mean, largest), (torch_mean, torch_largest) = _ulps(out, ref), _ulps(torch_out, ref)
        assert mean <= 1.6 * torch_mean + 0.1 and largest <= 2 * torch_largest + 1, (
            f"{name} on {band}: mean {mean:.3f} / max {largest:.2f} ulps, PyTorch {torch_mean:.3f} / "
            f"{torch_largest:.2f}")


@pytest.mark.parametrize("on_gpu", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["here", "gpu"])
def test_exp_f32_nearly_correctly_rounded(device, on_gpu):
    """The fp32 ``exp`` of the kernels against float64 over its whole range: normal results within 0.6 ulp, 0.3
    on average, unbiased (the point of it, see ``_exp_f32``), at least 98% correctly rounded; subnormal ones
    within one subnormal step; no NaN or inf."""
    if on_gpu:
        device = torch.device("cuda")
    triton_or_skip()
    v = torch.cat([torch.linspace(-104.0, 88.0, 150_000), torch.rand(50_000) * 40 - 20])
    out = torch.empty_like(v, device=device)
    _exp_kernel[(triton.cdiv(v.numel(), 4096),)](v.to(device), out, v.numel(), BLOCK=4096)
    out = out.cpu().double()
    exact = torch.exp(v.double())
    rounded = exact.float()
    normal = rounded.abs() >= torch.finfo(torch.float32).tiny
    ulp = (torch.nextafter(rounded, torch.tensor(float("inf"))) - rounded).double()
    err = ((out - exact) / ulp)[normal]
    assert torch.isfinite(out).all()
    assert err.abs().max() <= 0.6 and err.abs().mean() <= 0.3 and abs(err.mean()) <= 0.01, (
        f"max {err.abs().max():.3f}, mean {err.abs().mean():.3f}, signed mean {err.mean():+.4f} ulp")
    assert (out.float() == rounded)[normal].float().mean() >= 0.98
    assert (out - rounded.double())[~normal].abs().max() <= 2.0**-149
