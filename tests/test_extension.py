"""The C++/CUDA extension backend vs the reference (SPEC §4).

mirror_split / mirror_fuse bit for bit (sign of zero included), forward and backward; bn_mish forward and every
gradient within SPEC §4, running statistics vs ``nn.BatchNorm2d``, ``out=`` channel slices, determinism;
conv_bn_mish; opcheck and torch.compile; a fused cspmirrornet_tiny; and a compile-only check of the CUDA
sources with nvcc. The library is built once per session (skipped, with the reason, when it cannot be) and
runs with every output it allocates NaN-poisoned. CUDA variants are marked ``gpu``.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bn_cases import LOW, check_bn_case, make_case, run
from helpers import DTYPES, LAYOUTS, assert_within_spec, poison, randomize_bn, rel_err, to_layout

import cspmirror
from cspmirror import ops
from cspmirror.layers import BatchNormMish2d
from cspmirror.ops import reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
        torch.bfloat16: torch.int16}


@pytest.fixture(scope="module")
def lib():
    """``torch.ops.cspmirror_ext``, built (once) or skipped with the reason; outputs are NaN-poisoned."""
    from cspmirror.ops import extension

    status = extension.status()
    if not status.available:
        pytest.skip(f"extension unavailable: {status.reason}")
    library = extension.load()
    previous = library.set_poison_outputs(True)
    yield library
    library.set_poison_outputs(previous)


def assert_bitwise(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Same shape, dtype and bits (so -0.0 vs +0.0 counts as a difference)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    as_bits = BITS[out.dtype]
    assert torch.equal(out.cpu().contiguous().view(as_bits), ref.cpu().contiguous().view(as_bits))


def with_negative_zeros(t: torch.Tensor) -> torch.Tensor:
    """``t`` with about a tenth of its entries replaced by -0.0 (the reference turns lone ones into +0.0)."""
    return t.masked_fill(torch.rand(t.shape, device=t.device) < 0.1, -0.0)


def random(shape, dtype, layout, device) -> torch.Tensor:
    return to_layout(with_negative_zeros(torch.randn(shape)).to(device=device, dtype=dtype), layout)


def test_status_never_builds(tmp_path):
    """status() in a fresh process says what would happen and compiles nothing."""
    code = ("from cspmirror.ops import extension; s = extension.status(); "
            "print(s.available, s.reason); assert extension._loaded['lib'] is None")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not loaded yet" in done.stdout or "prebuilt" in done.stdout or "False" in done.stdout
    assert not any(tmp_path.iterdir())


def test_cuda_build_directory_names_the_architectures(tmp_path, monkeypatch):
    """One just-in-time CUDA build per set of target architectures (cpp_extension's hash leaves them out)."""
    from cspmirror.ops import extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    capabilities = {0: (9, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    assert extension.build_directory(True).name.endswith("-cuda-sm80-sm90")
    capabilities[1] = (9, 0)
    assert extension.build_directory(True).name.endswith("-cuda-sm90")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert extension.build_directory(True).name.endswith("-cuda-arch-8.0_9.0_PTX")
    assert extension.build_directory(False).name.endswith("-cpu")


def test_loaded_status_names_the_build(lib):
    from cspmirror.ops import extension

    status = extension.status()
    assert status.available and "cpu" in status.reason
    assert "cpu" in extension.build_info()


# --- mirror_split / mirror_fuse ------------------------------------------------------------------------------

SPLIT_GRID = [  # (shape, overlap, axis, mirror)
    ((2, 3, 4, 7), 0.25, -1, True),
    ((2, 3, 4, 8), 0.25, -1, False),
    ((1, 2, 3, 1), 0.25, -1, True),  # L = 1
    ((1, 2, 1, 3), 0.5, -2, True),
    ((2, 2, 5, 6), 0.0, -1, True),
    ((2, 2, 5, 6), 1.0, -1, True),
    ((1, 3, 9, 4), 1.0, -2, False),
    ((3, 1, 6, 5), 0.0, -2, True),  # C = 1
    ((2, 5, 3, 9), 0.75, -2, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,overlap,axis,mirror", SPLIT_GRID, ids=str)
def test_split_bitwise(lib, shape, overlap, axis, mirror, dtype, layout, device):
    x = random(shape, dtype, layout, device).requires_grad_()
    y = ops.mirror_split(x, overlap, axis, mirror, backend="extension")
    expected = reference.mirror_split(x, overlap, axis, mirror)
    assert_bitwise(y, expected)
    assert y.stride() == expected.stride()
    g = random(y.shape, dtype, layout, device)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(expected, x, g)
    assert torch.equal(gx, gx_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,overlap,axis,mirror", SPLIT_GRID, ids=str)
def test_fuse_bitwise(lib, shape, overlap, axis, mirror, dtype, layout, reduce, device):
    width = reference.mirror_split(torch.zeros(shape), overlap, axis, mirror).shape[axis]
    n, _, h, w = shape
    spatial = (h, width) if axis == -1 else (width, w)
    parts = [random((2 * n, c, *spatial), dtype, layout, device).requires_grad_() for c in (2, 3)]
    length = shape[axis]
    out = ops.mirror_fuse(parts, length, overlap, axis, mirror, reduce, backend="extension")
    expected = reference.mirror_fuse(parts, length, overlap, axis, mirror, reduce)
    assert_bitwise(out, expected)
    assert out.stride() == expected.stride()
    g = random(out.shape, dtype, layout, device)
    grads = torch.autograd.grad(out, parts, g)
    grads_ref = torch.autograd.grad(expected, parts, g)
    for got, want in zip(grads, grads_ref, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_split_fuse_of_strided_views(lib, device):
    """Inputs dense in neither layout (channel slices of channels_last buffers) give the reference's output."""
    for layout in LAYOUTS:  # channel slices: read in place (NCHW) or copied first (channels_last)
        buf = to_layout(with_negative_zeros(torch.randn(4, 9, 5, 7, device=device)), layout)
        for axis in (-1, -2):
            x = buf[:, 2:6]
            assert_bitwise(ops.mirror_split(x, 0.5, axis, backend="extension"), reference.mirror_split(x, 0.5, axis))
        parts = [buf[:, :3, :, :6], buf[:, 4:, :, 1:]]  # [4, C_i, 5, 6]: the model fuses slices like these
        for reduce in ("sum", "mean"):
            out = ops.mirror_fuse(parts, 7, 0.5, reduce=reduce, backend="extension")
            assert_bitwise(out, reference.mirror_fuse(parts, 7, 0.5, reduce=reduce))


@pytest.mark.parametrize("device", DEVICES)
def test_split_fuse_propagate_nan(lib, device):
    x = torch.randn(1, 2, 3, 6, device=device)
    x[0, 1, 2, 3] = float("nan")
    y = ops.mirror_split(x, 0.5, backend="extension")
    assert torch.equal(y.isnan(), reference.mirror_split(x, 0.5).isnan())
    out = ops.mirror_fuse([y], 6, 0.5, backend="extension")
    assert torch.equal(out.isnan(), x.isnan())


@pytest.mark.parametrize("mirror", [True, False])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("axis", [-1, -2])
def test_gradcheck_mirror_ops(lib, mirror, reduce, axis):
    """First and second derivatives (the backward ops' own autograd) in float64."""
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    split = lambda t: ops.mirror_split(t, 0.5, axis, mirror, backend="extension")  # noqa: E731
    assert torch.autograd.gradcheck(split, (x,))
    assert torch.autograd.gradgradcheck(split, (x,))
    parts = (torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True),
             torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True))

    def fuse(a, b):
        return ops.mirror_fuse([a, b], 5, 0.5, axis, mirror, reduce, backend="extension")

    assert torch.autograd.gradcheck(fuse, parts)
    assert torch.autograd.gradgradcheck(fuse, parts)


# --- bn_mish -------------------------------------------------------------------------------------------------

check_case = functools.partial(check_bn_case, backend="extension")


BN_SHAPES = [  # (shape, with residual)
    ((2, 3, 5, 7), True),
    ((3, 1, 2, 3), False),  # C = 1
    ((4, 5, 1, 1), True),  # H = W = 1
    ((4, 4, 48, 48), True),  # several fp32 flushes per plane, several row blocks in channels_last
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,residual", BN_SHAPES, ids=str)
def test_bn_mish_matches_reference(lib, shape, residual, dtype, layout, training, device):
    case = make_case(shape, dtype, layout, device, training=training, residual=residual)
    got = check_case(case)
    assert got["y"].stride() == case.x.stride() and got["dx"].stride() == case.x.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_bn_mish_fp32_parameters_with_low_precision_input(lib, dtype, training, device):
    case = make_case((2, 4, 3, 5), dtype, torch.channels_last, device, training=training,
                     param_dtype=torch.float32)
    got = check_case(case)
    assert got["dweight"].dtype == got["running_mean"].dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_mish_without_affine_or_running_stats(lib, training, device):
    check_case(make_case((2, 3, 4, 5), device=device, affine=False, running=not training, training=training))


@pytest.mark.parametrize("device", DEVICES)
def test_bn_mish_float64(lib, device):
    check_case(make_case((2, 3, 4, 5), torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_bn_mish_large_mean_and_magnitude(lib, layout, device):
    """|mean| >> std (the variance must not cancel) and |z| up to 1e4 (Mish must not overflow to NaN)."""
    check_case(make_case((2, 3, 6, 7), layout=layout, device=device, loc=3000.0, scale=1.0))
    case = make_case((2, 3, 6, 7), layout=layout, device=device, loc=0.0, scale=1.0)  # a large mean per channel
    case.x = to_layout(case.x + torch.tensor([0.0, 3000.0, -5000.0], device=device).view(1, 3, 1, 1), layout)
    check_case(case)
    case = make_case((2, 3, 6, 7), layout=layout, device=device, training=False, scale=1e4)
    case.running_var = torch.full_like(case.running_var, 1.0)
    check_case(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_mish_eps_inside_the_square_root(lib, training, device):
    """rstd = 1 / sqrt(var + eps), as nn.BatchNorm2d: with small variances and a larger eps, another placement is
    far outside SPEC section 4 (with the default cases' var ~ 4 and eps = 1e-5 it differs by ~4e-6 only)."""
    case = make_case((2, 3, 4, 5), device=device, training=training, scale=0.05, loc=0.0)
    case.eps = 1e-3
    check_case(case)


@pytest.mark.parametrize("device", DEVICES)
def test_mish_far_below_zero(lib, device):
    """z below -87, where the CPU exp polynomial stops: mish(z) is -0, and mish(-inf) is NaN, as the reference
    (the polynomial clamped its input, giving mish(-3e38) = -4.9 and mish(-inf) = -inf)."""
    x = torch.zeros(1, 4, 1, 2, device=device)
    mean = torch.tensor([3e38, 1e37, 1e30, 1e4], device=device)
    args = (x, None, None, mean, torch.ones(4, device=device), False)
    got = ops.bn_mish(*args, backend="extension")
    assert torch.equal(got, ops.bn_mish(*args, backend="reference")) and got.signbit().all()
    bias = torch.tensor([-math.inf, 0.0], device=device)
    weight = torch.zeros(2, 4, 1, 1, device=device)
    got = ops.conv_bn_mish(x, weight, bias, backend="extension")
    ref = ops.conv_bn_mish(x, weight, bias, backend="reference")
    assert got[:, 0].isnan().all() and ref[:, 0].isnan().all() and torch.equal(got[:, 1], ref[:, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_out_writes_are_seen_by_autograd(lib, device):
    """out= (and the running statistics) written by the C++ operators bump the version counters, as an
    in-place PyTorch op does: a backward that saved the old buffer raises instead of using the new values."""
    x = torch.randn(2, 4, 3, 3, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    calls = {
        "bn_mish train": lambda out: ops.bn_mish(x, None, None, rm, rv, True, out=out, backend="extension"),
        "bn_mish eval": lambda out: ops.bn_mish(x, None, None, rm, rv, False, out=out, backend="extension"),
        "conv_bn_mish": lambda out: ops.conv_bn_mish(x, torch.randn(4, 4, 1, 1, device=device), None, 1, out=out,
                                                     backend="extension"),
    }
    for name, call in calls.items():
        buf = torch.ones(2, 4, 3, 3, device=device)
        w = torch.ones(1, device=device, requires_grad=True)
        loss = (buf * w).sum()
        versions = (rm._version, rv._version)
        call(buf)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        if name == "bn_mish train":
            assert rm._version > versions[0] and rv._version > versions[1], name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_alone_needs_no_bn_backward(lib, monkeypatch, training):
    """When only the residual needs a gradient, it is the incoming gradient itself: no bn_mish backward runs."""
    from cspmirror.ops import extension

    x, residual = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5, requires_grad=True)
    y = ops.bn_mish(x, torch.ones(3), None, torch.zeros(3), torch.ones(3), training, residual=residual,
                    backend="extension")

    class NoBackward:
        def __getattr__(self, name):
            raise AssertionError(f"{name} ran")

    monkeypatch.setattr(extension, "_lib", lambda: NoBackward())
    grad = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, residual, grad)
    assert torch.equal(got, grad)


def test_operators_check_their_arguments(lib):
    """torch.ops.cspmirror_ext.* are public: bad arguments raise, never read out of bounds."""
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(RuntimeError, match="channels sum to"):
        lib.mirror_fuse_backward(torch.randn(2, 4, 2, 5), [4, 4000000], 3, -1, True, False)
    with pytest.raises(RuntimeError, match="channels must not be negative"):
        lib.mirror_fuse_backward(torch.randn(2, 4, 2, 5), [6, -2], 3, -1, True, False)
    with pytest.raises(RuntimeError, match=r"mean must have shape \[8\]"):
        lib.bn_mish_eval(x, None, None, torch.zeros(2), torch.ones(2), 1e-5, None)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[8\]"):
        lib.bn_mish_train(x, torch.ones(2), None, 1e-5, None)
    with pytest.raises(RuntimeError, match="x must not be empty"):
        lib.bn_mish_train(torch.empty(0, 3, 4, 4), None, None, 1e-5, None)
    with pytest.raises(RuntimeError, match="more than one value per channel"):  # unbiased variance: / (1 - 1)
        lib.bn_update_running_stats(torch.zeros(8), torch.ones(8), torch.zeros(8), torch.ones(8), 0.1, 1)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_match_batchnorm2d(lib, momentum):
    c = 4
    ours = BatchNormMish2d(c, momentum=momentum)
    ours.backend = "extension"
    theirs = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    for step in range(4):
        x = to_layout(torch.randn(3, c, 5, 6) * (step + 1) + step, LAYOUTS[step % 2])
        residual = torch.randn_like(x)
        torch.testing.assert_close(ours(x, residual), F.mish(theirs(x)) + residual)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key, rtol=1e-6, atol=1e-7)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, c, 3, 3)
    torch.testing.assert_close(ours(x), F.mish(theirs(x)))


def test_running_stats_made_in_inference_mode_update_outside_it(lib):
    """Running statistics created under torch.inference_mode are updated by a training call outside it, as
    F.batch_norm (the reference) and Triton do (the extension raised, after writing them)."""
    x = torch.randn(2, 3, 4, 5)
    with torch.inference_mode():
        ours = torch.zeros(3), torch.ones(3)
    theirs = torch.zeros(3), torch.ones(3)
    ops.bn_mish(x, None, None, *ours, True, backend="extension")
    ops.bn_mish(x, None, None, *theirs, True, backend="reference")
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_mish_out_channel_slice(lib, dtype, layout, grad, training, device):
    """out= a channel slice (odd offset) of a NaN buffer: exactly the slice is written (in place), y is out."""
    case = make_case((2, 3, 4, 5), dtype, layout=layout, device=device, training=training)
    expected = run(case, "extension")
    buf = poison(to_layout(torch.empty(2, 8, 4, 5, device=device, dtype=dtype), layout))
    out = buf[:, 3:6]
    if grad:
        got = run(case, "extension", out=out)
        for name in ("dx", "dweight", "dbias", "dresidual"):
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    else:
        with torch.no_grad():
            got = {"y": ops.bn_mish(case.x, case.weight, case.bias, case.running_mean, case.running_var,
                                    training, residual=case.residual, out=out, backend="extension")}
    assert got["y"] is out
    torch.testing.assert_close(out, expected["y"].detach(), rtol=0, atol=0)
    assert buf[:, :3].isnan().all() and buf[:, 6:].isnan().all()


def _copies(call) -> int:
    """How many aten::copy_ ``call`` runs (a write through a temporary is one more)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::copy_")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_out_channel_slice_is_written_in_place(lib, layout, training):
    """SPEC §3's write into a channel slice of a larger buffer goes straight there, as into a dense out=,
    without a temporary and a copy (bn_mish and conv_bn_mish alike)."""
    x = to_layout(torch.randn(2, 3, 4, 5), layout)
    weight = torch.randn(3, 3, 1, 1)
    rm, rv = torch.zeros(3), torch.ones(3)
    bn_mish = functools.partial(ops.bn_mish, x, None, None, rm, rv, training, backend="extension")
    conv = functools.partial(ops.conv_bn_mish, x, weight, None, 1, backend="extension")
    with torch.no_grad():
        for op in (bn_mish, conv):
            dense = to_layout(torch.empty(2, 3, 4, 5), layout)
            buf = to_layout(torch.empty(2, 8, 4, 5), layout)
            assert _copies(lambda: op(out=buf[:, 3:6])) == _copies(lambda: op(out=dense))  # noqa: B023


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_out_overlapping_an_input_in_part(lib, layout):
    """out= two channels over the residual's (or x's) last two: written through a temporary, so that no
    element is overwritten before it is read; the result is that of separate tensors."""
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    for shared in ("residual", "x"):
        buf = to_layout(torch.randn(2, 6, 3, 5), layout)
        x = buf[:, 0:4] if shared == "x" else to_layout(torch.randn(2, 4, 3, 5), layout)
        residual = buf[:, 0:4] if shared == "residual" else None
        expected = ops.bn_mish(x.clone(), None, None, rm, rv, False, residual=None if residual is None else
                               residual.clone(), backend="reference")
        with torch.no_grad():
            ops.bn_mish(x, None, None, rm, rv, False, residual=residual, out=buf[:, 2:6], backend="extension")
        torch.testing.assert_close(buf[:, 2:6], expected, rtol=1e-6, atol=1e-6, msg=shared)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_residual_read_through_strides(lib, layout, device):
    """A residual that is a channel slice (read in place) or transposed (copied) gives the dense result."""
    case = make_case((2, 3, 4, 5), layout=layout, device=device, training=False)
    buf = to_layout(torch.randn(2, 7, 4, 5, device=device), layout)
    odd = torch.randn(2, 3, 5, 4, device=device).transpose(2, 3)
    w = torch.randn(3, 3, 3, 3, device=device) / 5
    for residual in (buf[:, 2:5], odd):
        dense = residual.contiguous(memory_format=layout)
        with torch.no_grad():
            for training in (True, False):
                args = (case.x, case.weight, case.bias, case.running_mean, case.running_var, training)
                got = ops.bn_mish(*args, residual=residual, backend="extension")
                torch.testing.assert_close(got, ops.bn_mish(*args, residual=dense, backend="extension"),
                                           rtol=0, atol=0)
            got = ops.conv_bn_mish(case.x, w, None, 1, residual, backend="extension")
            torch.testing.assert_close(got, ops.conv_bn_mish(case.x, w, None, 1, dense, backend="extension"),
                                       rtol=0, atol=0)


def test_bn_mish_out_with_odd_strides(lib):
    """An out= whose strides fit neither walk is written through a temporary."""
    case = make_case((2, 3, 5, 4), residual=False)
    out = poison(torch.empty(2, 3, 4, 5)).transpose(2, 3)
    with torch.no_grad():
        y = ops.bn_mish(case.x, case.weight, case.bias, None, None, True, out=out, backend="extension")
        expected = ops.bn_mish(case.x, case.weight, case.bias, None, None, True, backend="extension")
    assert y is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_bn_mish_is_deterministic_for_any_thread_count(lib, layout):
    case = make_case((3, 6, 20, 30), layout=layout)
    first = run(case, "extension")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(case, "extension")
    finally:
        torch.set_num_threads(threads)
    for name, value in first.items():
        assert_bitwise(value.detach(), single[name].detach())


# --- conv_bn_mish --------------------------------------------------------------------------------------------

CONV_CASES = [(1, 1), (1, 3), (2, 3), (2, 1)]  # (stride, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride,k", CONV_CASES, ids=str)
def test_conv_bn_mish_matches_reference(lib, stride, k, dtype, layout, device):
    x = to_layout(torch.randn(2, 5, 9, 7), layout).to(device=device, dtype=dtype)
    w = (torch.randn(6, 5, k, k) / (5 * k * k) ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(6).to(device=device, dtype=dtype)
    shape = (2, 6, (9 - 1) // stride + 1, (7 - 1) // stride + 1)
    residual = to_layout(torch.randn(shape), layout).to(device=device, dtype=dtype)
    with torch.backends.cudnn.flags(allow_tf32=False):
        got = ops.conv_bn_mish(x, w, b, stride, residual, backend="extension")
        ref = reference.conv_bn_mish(x.double(), w.double(), b.double(), stride, residual.double())
        lowp = reference.conv_bn_mish(x, w, b, stride, residual) if dtype in LOW else None
    assert_within_spec(got, ref, lowp, 1e-4, what="conv_bn_mish")
    assert got.dtype == dtype and got.is_contiguous(memory_format=layout)
    buf = poison(to_layout(torch.empty(2, 9, *shape[2:], device=device, dtype=dtype), layout))
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):
        y = ops.conv_bn_mish(x, w, b, stride, residual, out=buf[:, 1:7], backend="extension")
    if y.is_cuda:
        # cuDNN may pick another algorithm for a strided output (seen on an H100): same bound, not same bits.
        assert_within_spec(y, ref, lowp, 1e-4, what="conv_bn_mish out=")
    else:
        torch.testing.assert_close(y, got, rtol=0, atol=0)
    assert buf[:, :1].isnan().all() and buf[:, 7:].isnan().all()


# nhwc_slice: a channel slice of a channels_last buffer; expanded: one channel broadcast (channel stride 0, which
# ATen never counts as channels_last)
FORMATS = ["nchw", "nhwc", "nhwc_slice", "expanded"]


def in_format(shape, fmt: str, device) -> torch.Tensor:
    n, c, h, w = shape
    if fmt == "expanded":
        return torch.randn(n, 1, h, w, device=device).expand(shape)
    if fmt == "nhwc_slice":
        return to_layout(torch.randn(n, c + 2, h, w, device=device), torch.channels_last)[:, 1:c + 1]
    return to_layout(torch.randn(shape, device=device), LAYOUTS[fmt == "nhwc"])


def assert_strides_of_reference_and_fake(op, *args, what: str) -> None:
    """``op(*args, backend="extension")`` has the reference's strides, and so has its fake implementation (what
    torch.compile traces with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    got, ref = op(*args, backend="extension"), op(*args, backend="reference")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args), backend="extension")
    assert got.stride() == ref.stride(), f"{what}: eager"
    assert fake.stride() == got.stride(), f"{what}: fake"


@pytest.mark.parametrize("device", DEVICES)
def test_conv_bn_mish_output_format_is_the_references(lib, device):
    """channels_last when x or the weight is strided like it, a channel slice of a channels_last buffer
    included (ATen's convolution, the reference); was: x's own format, whatever the weight's. On CUDA, NCHW in
    float64 (cuDNN's rule); was: channels_last."""
    for x_format, w_format, k, dtype in itertools.product(FORMATS, FORMATS[:2], (1, 3),
                                                          (torch.float32, torch.float64)):
        x, w = in_format((2, 5, 6, 7), x_format, device), in_format((6, 5, k, k), w_format, device)
        with torch.no_grad():
            assert_strides_of_reference_and_fake(ops.conv_bn_mish, x.to(dtype), w.to(dtype),
                                                 torch.randn(6, device=device, dtype=dtype), 1,
                                                 what=f"x {x_format}, weight {w_format}, k={k}, {dtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_bn_mish_output_format_is_the_references(lib, device):
    """A channel slice of a channels_last buffer gives a channels_last output, as on the reference (ATen's
    batch_norm); was: contiguous."""
    stats = (torch.zeros(5, device=device), torch.ones(5, device=device))
    for x_format, training in itertools.product(FORMATS, (True, False)):
        with torch.no_grad():
            assert_strides_of_reference_and_fake(ops.bn_mish, in_format((2, 5, 6, 7), x_format, device), None,
                                                 None, *stats, training, what=f"x {x_format}, training={training}")


def test_conv_bn_mish_gradients(lib):
    """The inference op still differentiates (recomputing through ATen's backward ops)."""
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(1, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b, r: ops.conv_bn_mish(x, w, b, 2, r, backend="extension")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, r))


# --- opcheck, torch.compile ----------------------------------------------------------------------------------

def opcheck_samples(lib, device):
    t = lambda *s, **kw: torch.randn(*s, device=device, **kw)  # noqa: E731
    x, cl = t(2, 3, 4, 6), t(2, 3, 4, 6).contiguous(memory_format=torch.channels_last)
    w, b, rm, rv = t(3).abs() + 0.5, t(3), t(3), t(3).abs() + 0.5
    parts = [t(4, 2, 4, 4), t(4, 1, 4, 4)]
    grad = lambda *s: t(*s)  # noqa: E731
    return [
        (lib.mirror_split.default, (x.requires_grad_(), 4, -1, True)),
        (lib.mirror_split.default, (cl, 3, -2, False)),
        (lib.mirror_fuse.default, ([p.requires_grad_() for p in parts], 6, -1, True, True)),
        (lib.mirror_fuse_backward.default, (grad(2, 3, 4, 6).requires_grad_(), [2, 1], 4, -1, True, True)),
        (lib.bn_mish_train.default, (t(2, 3, 4, 6, requires_grad=True), w.requires_grad_(), b, 1e-5,
                                     t(2, 3, 4, 6))),
        (lib.bn_mish_train.default, (cl, None, None, 1e-5, None)),
        (lib.bn_mish_train_out.default, (x.detach(), w.detach(), b, 1e-5, None, torch.empty_like(x))),
        (lib.bn_mish_eval.default, (t(2, 3, 4, 6, requires_grad=True), w.detach(), b, rm, rv, 1e-5, None)),
        (lib.bn_mish_eval_out.default, (x.detach(), w.detach(), b, rm, rv, 1e-5, None, torch.empty_like(x))),
        (lib.bn_mish_backward.default, (grad(2, 3, 4, 6), x.detach(), w.detach(), b, rm, rv, 1e-5, True, True)),
        (lib.bn_mish_backward.default, (grad(2, 3, 4, 6), cl, None, None, rm, rv, 1e-5, False, False)),
        (lib.bn_update_running_stats.default, (rm.clone(), rv.clone(), t(3), t(3).abs(), 0.1, 48)),
        (lib.conv_bn_mish.default, (x.detach().requires_grad_(), t(5, 3, 3, 3), t(5), 2, None)),
        (lib.conv_bn_mish.default, (cl, t(5, 3, 1, 1), None, 1, t(2, 5, 4, 6))),
        (lib.conv_bn_mish.default, (x.detach(), t(5, 3, 3, 3).contiguous(memory_format=torch.channels_last), None, 2,
                                    None)),
        (lib.bn_mish_train.default, (t(2, 5, 4, 6).contiguous(memory_format=torch.channels_last)[:, 1:4], None, None,
                                     1e-5, None)),
        (lib.conv_bn_mish_out.default, (x.detach(), t(5, 3, 3, 3), t(5), 1, None, t(2, 5, 4, 6))),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(lib, device):
    for op, args in opcheck_samples(lib, device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(lib, device):
    """Split, train-mode bn_mish (running stats updated in the graph) and fuse compile without graph breaks."""
    from cspmirror.ops import extension

    def step(x, weight, bias, running_mean, running_var):
        p = extension.mirror_split(x, 0.25, -1, True)
        y = extension.bn_mish(p, weight, bias, running_mean, running_var, True, 0.1, 1e-5, p)
        return extension.mirror_fuse([y, p], x.shape[-1], 0.25, -1, True, "sum")

    def inputs():
        torch.manual_seed(1)
        x = torch.randn(2, 3, 4, 7, device=device, requires_grad=True)
        return x, torch.rand(3, device=device) + 0.5, torch.randn(3, device=device), \
            torch.zeros(3, device=device), torch.ones(3, device=device)

    eager_in, compiled_in = inputs(), inputs()
    eager = step(*eager_in)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled_in)
    torch.testing.assert_close(compiled, eager)
    eager.sum().backward()
    compiled.sum().backward()
    torch.testing.assert_close(compiled_in[0].grad, eager_in[0].grad)
    torch.testing.assert_close(compiled_in[3], eager_in[3])
    torch.testing.assert_close(compiled_in[4], eager_in[4])


@pytest.mark.parametrize("device", DEVICES)
def test_plain_eager_skips_the_registered_autograd(lib, monkeypatch, device):
    """In plain eager mode the operators run below their autograd key, under the same formulas in a plain
    ``autograd.Function`` (cspmirror/ops/_eager.py): no registered operator is called there, gradients are
    the reference's, and no zero gradient is filled for the batch statistics. Any dispatch mode sees the
    registered operators."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cspmirror.ops import extension

    def forbidden(*args):
        raise AssertionError("the registered operator ran in plain eager mode")

    for eager_op in extension._EAGER.values():
        monkeypatch.setattr(eager_op, "op", forbidden)

    def step(backend: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        parts = ops.mirror_split(x, backend=backend)
        y = ops.bn_mish(parts, w, None, torch.zeros(3, device=device), torch.ones(3, device=device), True,
                        backend=backend)
        fused = ops.mirror_fuse([y], x.shape[-1], backend=backend)
        return ops.bn_mish(fused, w, None, torch.zeros(3, device=device), torch.ones(3, device=device), False,
                           backend=backend)

    x, w = torch.randn(2, 3, 4, 7, device=device), torch.rand(3, device=device) + 0.5
    leaves = {b: (x.clone().requires_grad_(), w.clone().requires_grad_()) for b in ("extension", "reference")}
    out = {b: step(b, *leaves[b]) for b in leaves}
    grad = torch.randn_like(out["reference"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out["extension"].backward(grad)
    out["reference"].backward(grad)
    assert not [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zero_")]  # (fills: NaN poison)
    torch.testing.assert_close(out["extension"], out["reference"], rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(leaves["extension"], leaves["reference"], strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)

    class Names(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(str(func))
            return func(*args, **(kwargs or {}))

    names: list[str] = []
    monkeypatch.undo()
    with Names():
        ops.bn_mish(torch.randn(2, 3, 4, 7, device=device), None, None, None, None, True, backend="extension")
    assert "cspmirror_ext.bn_mish_train.default" in names


# --- the model -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_fused_tiny_model_matches_reference(lib, layout, device):
    model = cspmirror.cspmirrornet_tiny(num_classes=10).to(device)
    randomize_bn(model)
    model.eval()
    x = to_layout(torch.randn(2, 3, 32, 32, device=device), layout)
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):
        ref = cspmirror.set_backend(copy.deepcopy(model), "reference")(x)  # unfused, reference backend
        fused = cspmirror.fuse_for_inference(copy.deepcopy(model), backend="extension")
        got = fused(x)
    assert rel_err(got, ref) <= 1e-4


def test_tiny_model_training_step_matches_reference(lib):
    torch.manual_seed(3)
    model = cspmirror.cspmirrornet_tiny(num_classes=10)
    randomize_bn(model)
    ours = cspmirror.set_backend(copy.deepcopy(model), "extension")
    x = torch.randn(2, 3, 32, 32)
    losses = [m(x).logsumexp(1).sum() for m in (model, ours)]
    for loss in losses:
        loss.backward()
    assert rel_err(losses[1], losses[0]) <= 1e-5
    for (name, p_ref), p in zip(model.named_parameters(), ours.parameters(), strict=True):
        assert rel_err(p.grad, p_ref.grad) <= 1e-3, name
    for (name, b_ref), b in zip(model.named_buffers(), ours.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6, msg=name)


# --- GPU: realistic sizes and 64-bit offsets -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_gpu_realistic_shapes(lib, layout):
    """Many reduction blocks per channel (NCHW) and many row blocks (channels_last) on the GPU."""
    check_case(make_case((8, 64, 56, 56), layout=layout, device="cuda"))
    check_case(make_case((8, 64, 56, 56), torch.bfloat16, layout=layout, device="cuda"))
    x = random((8, 128, 28, 28), torch.float16, layout, "cuda")
    assert_bitwise(ops.mirror_split(x, backend="extension"), reference.mirror_split(x))
    parts = [random((16, 64, 28, 17), torch.float16, layout, "cuda") for _ in range(2)]
    assert_bitwise(ops.mirror_fuse(parts, 28, backend="extension"), reference.mirror_fuse(parts, 28))


@pytest.mark.gpu
def test_gpu_64bit_offsets(lib):
    """Tensors past 2**31 elements take the 64-bit index path (about 13 GB of GPU memory)."""
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs 24 GB of free GPU memory")
    small = torch.randn(1, 4, 1024, 1025, device="cuda", dtype=torch.float16)
    big = small.expand(512, -1, -1, -1).contiguous()  # 2.15e9 elements
    assert big.numel() > 2**31
    y = ops.mirror_split(big, 0.25, -1, True, backend="extension")
    expected = reference.mirror_split(small, 0.25, -1, True)
    assert_bitwise(y[511:512], expected[:1])
    assert_bitwise(y[1023:], expected[1:])
    del y
    with torch.no_grad():
        y = ops.bn_mish(big, None, None, None, None, True, backend="extension")
        y_small = ops.bn_mish(small, None, None, None, None, True, backend="extension")
    torch.testing.assert_close(y[-1:], y_small, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y[:1], y_small, rtol=2e-3, atol=2e-3)


# --- the CUDA sources compile (no GPU needed) ----------------------------------------------------------------

def _cuda_include_paths() -> list[str]:
    from torch.utils import cpp_extension

    try:
        paths = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch: include_paths(cuda: bool)
        paths = cpp_extension.include_paths(cuda=True)
    return [*paths, sysconfig.get_paths()["include"]]


@pytest.mark.slow
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Compile csrc/cuda_kernels.cu to sm_90 PTX with torch's headers, so the CUDA code cannot rot unseen on
    machines without a GPU. nvcc's front end checks the host code too (a type error there fails this); only
    the host compiler's own pass is skipped, which would triple the time (20 s of CPU here instead of 60)."""
    from torch.utils import cpp_extension

    from cspmirror.ops import extension

    nvcc = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and str(Path(cpp_extension.CUDA_HOME, "bin", "nvcc")))
    if not nvcc or not Path(nvcc).is_file():
        pytest.skip("nvcc not found")
    csrc = extension.csrc_dir()
    if csrc is None:
        pytest.skip("csrc/ is not part of this install")
    std = "-std=c++20" if "-std=c++20" in Path(cpp_extension.__file__).read_text() else "-std=c++17"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    ptx = tmp_path / "cuda_kernels.ptx"
    command = [nvcc, "--ptx", str(csrc / "cuda_kernels.cu"), "-o", str(ptx), std, "-O3", "-arch=compute_90",
               "--compiler-options", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               *getattr(cpp_extension, "COMMON_NVCC_FLAGS", []), *(f"-I{p}" for p in _cuda_include_paths()),
               "-DCSPMIRROR_WITH_CUDA"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert ".entry" in ptx.read_text(), "no kernel in the PTX"
    print(f"nvcc compiled cuda_kernels.cu to PTX in {time.perf_counter() - start:.0f} s", file=sys.stderr)
