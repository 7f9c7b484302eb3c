"""Memory formats of the fast ops' gradients (and of the outputs left to check) across backends.

The rules live in :mod:`cspmirror.ops.reference`: forward outputs and the bn / conv gradients are the reference's
(ATen's); a mirror op's input gradient is laid out like that input (``grad_memory_format``), what the reference's
``.grad`` of a leaf shows after ``AccumulateGrad`` and what the layer before it reads.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import fast_backend_or_skip

from cspmirror import ops
from cspmirror.ops import reference

FAST = ["triton", "extension"]
INPUTS = ["nchw", "nhwc", "nhwc_slice", "permuted", "expanded"]


def make(kind: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device) -> torch.Tensor:
    """An [N, C, H, W] tensor of ``kind``: dense NCHW / NHWC, a channel slice of an NHWC buffer, a dense
    N, H, C, W buffer seen as NCHW (neither format), or a batch expanded from one sample (stride 0)."""
    n, c, h, w = shape
    if kind == "nhwc_slice":
        return torch.randn(n, c + 2, h, w, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)[:, 1:c + 1]
    if kind == "permuted":
        return torch.randn(n, h, c, w, device=device, dtype=dtype).permute(0, 2, 1, 3)
    if kind == "expanded":
        return torch.randn(1, c, h, w, device=device, dtype=dtype).expand(shape)
    fmt = torch.channels_last if kind == "nhwc" else torch.contiguous_format
    return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)


def significant(t: torch.Tensor) -> tuple[int | None, ...]:
    """``t``'s strides, those of size-1 dims left out (they locate nothing)."""
    return tuple(None if size == 1 else stride for size, stride in zip(t.shape, t.stride(), strict=True))


# The layout of a gradient laid out like an input of each kind: a dense input's own, channels_last for the
# channel slice (as ATen's ops read it), NCHW for the others.
GRAD_FORMAT = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last, "nhwc_slice": torch.channels_last,
               "permuted": torch.contiguous_format, "expanded": torch.contiguous_format}


def assert_laid_out_like(grad: torch.Tensor, t: torch.Tensor, kind: str, what: str) -> None:
    """``grad`` is dense in the format of ``t`` (of ``kind``), which ``reference.grad_memory_format`` names; for a
    dense ``t``, ``t``'s own strides (AccumulateGrad stores it as ``.grad`` without a copy)."""
    want = torch.empty(t.shape, memory_format=GRAD_FORMAT[kind])
    assert significant(grad) == significant(want), f"{what}: strides {grad.stride()}, want {want.stride()}"


@pytest.mark.parametrize("backend", FAST)
def test_mirror_gradients_are_laid_out_like_their_inputs(backend, device):
    """Was: Triton gave a channel slice of a channels_last buffer (a channels_last model's first fuse part) an
    NCHW gradient, and the extension laid the gradients out like the output's gradient (x NHWC with an NCHW
    gradient: NCHW; x NCHW with an NHWC gradient: NHWC). Values stay the reference's, bit for bit."""
    fast_backend_or_skip(backend)
    for dtype, kind, grad_fmt in itertools.product((torch.float32, torch.float16), INPUTS,
                                                   (torch.contiguous_format, torch.channels_last)):
        what = f"{dtype}, input {kind}, gradient {grad_fmt}"
        x = make(kind, (2, 3, 4, 7), dtype, device).requires_grad_()
        gy = torch.randn(4, 3, 4, 5, device=device, dtype=dtype).contiguous(memory_format=grad_fmt)
        got, ref = (torch.autograd.grad(ops.mirror_split(x, backend=b), x, gy)[0] for b in (backend, "reference"))
        assert torch.equal(got, ref), what
        assert_laid_out_like(got, x, kind, f"split, {what}")
        kinds = (kind, "nchw" if grad_fmt == torch.channels_last else "nhwc")  # the second: not the gradient's
        parts = [make(k, (4, c, 4, 5), dtype, device).requires_grad_() for k, c in zip(kinds, (3, 2), strict=True)]
        gz = torch.randn(2, 5, 4, 7, device=device, dtype=dtype).contiguous(memory_format=grad_fmt)
        got, ref = (torch.autograd.grad(ops.mirror_fuse(parts, 7, backend=b), parts, gz)
                    for b in (backend, "reference"))
        for i, (g, r, p, k) in enumerate(zip(got, ref, parts, kinds, strict=True)):
            assert torch.equal(g, r), f"fuse part {i}, {what}"
            assert_laid_out_like(g, p, k, f"fuse part {i}, {what}")
    for kind in INPUTS:  # the rule's one home
        assert reference.grad_memory_format(make(kind, (2, 3, 4, 5), torch.float32, device)) == GRAD_FORMAT[kind]


@pytest.mark.parametrize("backend", FAST)
def test_bn_mish_and_conv_layouts_are_the_references(backend, device):
    """Output and every gradient (x, weight, bias, residual) in the reference's strides, for each input kind and
    either format of the output's gradient. Was (Triton bn_mish): a dense input in neither format (permuted)
    gave its own strides to the output and to x's gradient, the reference NCHW. Triton's conv_bn_mish output is
    channels_last whatever its input (triton_conv's documented choice): its gradients are checked, not its
    output."""
    fast_backend_or_skip(backend)
    for dtype, kind, grad_fmt, training in itertools.product(
            (torch.float32, torch.float16), INPUTS, (torch.contiguous_format, torch.channels_last), (True, False)):
        what = f"{dtype}, x {kind}, gradient {grad_fmt}, training={training}"
        x = make(kind, (2, 3, 4, 5), dtype, device).requires_grad_()
        w, b = (torch.randn(3, device=device, requires_grad=True) for _ in range(2))
        res = make("nhwc" if kind == "nchw" else "nchw", (2, 3, 4, 5), dtype, device).requires_grad_()
        stats = (torch.zeros(3, device=device), torch.ones(3, device=device))
        results = {}
        for be in (backend, "reference"):
            y = ops.bn_mish(x, w, b, *stats, training, residual=res, backend=be)
            gy = torch.randn(y.shape, device=device, dtype=dtype).contiguous(memory_format=grad_fmt)
            results[be] = [y, *torch.autograd.grad(y, [x, w, b, res], gy)]
        for name, got, ref in zip(("out", "x", "weight", "bias", "residual"), *results.values(), strict=True):
            assert significant(got) == significant(ref), f"bn_mish {name}, {what}"
        if training:  # conv: once per case
            weight = make("nhwc" if kind == "nchw" else "nchw", (4, 3, 3, 3), dtype, device).requires_grad_()
            bias = torch.randn(4, device=device, dtype=dtype, requires_grad=True)
            results = {}
            for be in (backend, "reference"):
                y = ops.conv_bn_mish(x, weight, bias, backend=be)
                gy = torch.randn(y.shape, device=device, dtype=dtype).contiguous(memory_format=grad_fmt)
                results[be] = [y, *torch.autograd.grad(y, [x, weight, bias], gy)]
            skip = 1 if backend == "triton" else 0
            for name, got, ref in list(zip(("out", "x", "weight", "bias"), *results.values(), strict=True))[skip:]:
                assert significant(got) == significant(ref), f"conv_bn_mish {name}, {what}"


def test_conv_memory_format_is_atens_on_cuda():
    """The rule the extension's conv_bn_mish and its fake implementation follow is ATen's on CUDA too, asked of
    PyTorch's own fake convolution on CUDA tensors (no GPU needed): cuDNN never runs float64 in channels_last.
    Was: channels_last for a channels_last float64 input or weight (the reference: NCHW)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for dtype, kind, w_kind in itertools.product((torch.float64, torch.float32, torch.float16), INPUTS[:3],
                                                     ("nchw", "nhwc")):
            x = make(kind, (2, 5, 6, 7), dtype, "cuda")
            w = make(w_kind, (6, 5, 3, 3), dtype, "cuda")
            y = F.conv2d(x, w, None, 1, 1)
            want = torch.empty(y.shape, memory_format=reference.conv_memory_format(x, w))
            assert significant(y) == significant(want), f"{dtype}, x {kind}, weight {w_kind}"
