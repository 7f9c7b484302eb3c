"""The reference ops against independent loop implementations, adjointness, gradcheck, BatchNorm parity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cspmirror import ops
from cspmirror.ops import reference


def loop_split(x: torch.Tensor, overlap: float, axis: int, mirror: bool) -> torch.Tensor:
    """mirror_split written element by element from the SPEC's definition (axis -1 or -2)."""
    xs = x if axis == -1 else x.transpose(-1, -2)
    n, c, h, length = xs.shape
    half = math.ceil(length / 2)
    width = min(half + math.floor(overlap * half), length)
    y = torch.empty(2 * n, c, h, width, dtype=x.dtype)
    for b, ch, row, col in itertools.product(range(n), range(c), range(h), range(width)):
        y[b, ch, row, col] = xs[b, ch, row, col]
        src = length - 1 - col if mirror else length - width + col
        y[n + b, ch, row, col] = xs[b, ch, row, src]
    return y if axis == -1 else y.transpose(-1, -2)


def loop_fuse(parts: list[torch.Tensor], length: int, axis: int, mirror: bool, reduce: str) -> torch.Tensor:
    """mirror_fuse element by element: every output column sums the part columns that land on it."""
    z = torch.cat(parts, dim=1)
    zs = z if axis == -1 else z.transpose(-1, -2)
    two_n, c, h, width = zs.shape
    n = two_n // 2
    out = torch.zeros(n, c, h, length, dtype=torch.float64)
    hits = [0] * length
    for col in range(width):
        hits[col] += 1
        hits[length - 1 - col if mirror else length - width + col] += 1
    for b, ch, row, col in itertools.product(range(n), range(c), range(h), range(width)):
        out[b, ch, row, col] += zs[b, ch, row, col].double()
        dst = length - 1 - col if mirror else length - width + col
        out[b, ch, row, dst] += zs[n + b, ch, row, col].double()
    if reduce == "mean":
        for col in range(length):
            if hits[col] == 2:
                out[..., col] /= 2
    out = out.to(z.dtype)
    return out if axis == -1 else out.transpose(-1, -2)


SPLIT_GRID = [
    # (shape, overlap, axis, mirror)
    ((2, 3, 4, 7), 0.25, -1, True),
    ((2, 3, 4, 8), 0.25, -1, False),
    ((1, 2, 3, 1), 0.25, -1, True),
    ((1, 2, 1, 3), 0.5, -2, True),
    ((2, 2, 5, 6), 0.0, -1, True),
    ((2, 2, 5, 6), 1.0, -1, True),
    ((1, 3, 9, 4), 1.0, -2, False),
    ((3, 1, 6, 5), 0.0, -2, True),
    ((1, 2, 2, 2), 0.75, -1, True),
]


@pytest.mark.parametrize("shape,overlap,axis,mirror", SPLIT_GRID)
def test_split_matches_loops(shape, overlap, axis, mirror):
    x = torch.randn(shape)
    assert torch.equal(ops.mirror_split(x, overlap, axis, mirror), loop_split(x, overlap, axis, mirror))


@pytest.mark.parametrize("shape,overlap,axis,mirror", SPLIT_GRID)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_fuse_matches_loops(shape, overlap, axis, mirror, reduce):
    n, _, h, w = shape
    length = shape[axis]
    width = reference.mirror_split(torch.zeros(shape), overlap, axis, mirror).shape[axis]
    part_shape = (2 * n, 0, h, width) if axis == -1 else (2 * n, 0, width, w)
    parts = [torch.randn(part_shape[:1] + (ci,) + part_shape[2:]) for ci in (2, 3)]
    out = ops.mirror_fuse(parts, length, overlap, axis, mirror, reduce)
    assert out.shape == (n, 5, h, w)
    torch.testing.assert_close(out, loop_fuse(parts, length, axis, mirror, reduce), rtol=1e-6, atol=1e-6)


def test_split_width_formula():
    # SPEC §1.1 worked example: L = 8, overlap 0.25 -> half 4, o 1, P 5; overlap columns L-P..P-1 = 3..4.
    x = torch.arange(8.0).reshape(1, 1, 1, 8)
    y = ops.mirror_split(x, 0.25, -1, True)
    assert y[0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert y[1, 0, 0].tolist() == [7, 6, 5, 4, 3]
    assert ops.mirror_split(torch.randn(1, 1, 1, 1)).shape == (2, 1, 1, 1)


@pytest.mark.parametrize("shape,overlap,axis,mirror", SPLIT_GRID[:6])
def test_adjoint_identity(shape, overlap, axis, mirror):
    """The sum-fuse is split's adjoint: <split(x), g> == <x, fuse(g, "sum")>; the mean-fuse is its left
    inverse: fuse(split(x), "mean") == x."""
    x = torch.randn(shape, dtype=torch.float64)
    y = ops.mirror_split(x, overlap, axis, mirror)
    g = torch.randn_like(y)
    fused = ops.mirror_fuse([g], shape[axis], overlap, axis, mirror, "sum")
    torch.testing.assert_close((y * g).sum(), (x * fused).sum(), rtol=1e-12, atol=1e-12)
    back = ops.mirror_fuse([y], shape[axis], overlap, axis, mirror, "mean")
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


def test_split_then_sum_fuse_doubles_overlap():
    x = torch.randn(1, 2, 3, 9, dtype=torch.float64)
    back = ops.mirror_fuse([ops.mirror_split(x, 0.5)], 9, 0.5)
    length, width = 9, ops.mirror_split(x, 0.5).shape[-1]
    scale = torch.ones(length, dtype=torch.float64)
    scale[length - width:width] = 2
    torch.testing.assert_close(back, x * scale)


@pytest.mark.parametrize("mirror", [True, False])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_gradcheck_mirror_ops(mirror, reduce):
    x = torch.randn(1, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.mirror_split(t, 0.5, -1, mirror), (x,))
    parts = (torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True),
             torch.randn(2, 1, 3, 4, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda a, b: ops.mirror_fuse([a, b], 5, 0.5, -1, mirror, reduce), parts)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_gradcheck_bn_mish(training, with_residual):
    c = 3
    x = torch.randn(2, c, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, c, 3, 4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5

    def fn(x, w, b, r):
        return ops.bn_mish(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, r if with_residual else None)

    assert torch.autograd.gradcheck(fn, (x, w, b, r))


@pytest.mark.parametrize("stride,k", [(1, 1), (1, 3), (2, 3), (2, 1)])
def test_gradcheck_conv_bn_mish(stride, k):
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.conv_bn_mish(x, w, b, stride), (x, w, b))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_mish_matches_torch_batchnorm_over_steps(momentum):
    from cspmirror import BatchNormMish2d

    c = 4
    ours = BatchNormMish2d(c, momentum=momentum)
    theirs = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    for step in range(4):
        x = torch.randn(3, c, 5, 6) * (step + 1) + step
        residual = torch.randn_like(x)
        torch.testing.assert_close(ours(x, residual), F.mish(theirs(x)) + residual)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, c, 3, 3)
    torch.testing.assert_close(ours(x), F.mish(theirs(x)))


def test_bn_mish_functional_equals_batch_norm_then_mish():
    x = torch.randn(2, 3, 4, 5)
    w, b = torch.rand(3), torch.randn(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm2, rv2 = rm.clone(), rv.clone()
    r = torch.randn_like(x)
    y = ops.bn_mish(x, w, b, rm, rv, True, 0.3, 1e-3, r)
    expected = F.mish(F.batch_norm(x, rm2, rv2, w, b, True, 0.3, 1e-3)) + r
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


@pytest.mark.parametrize("training", [True, False])
def test_bn_mish_gradient_of_an_input_with_odd_size_one_strides(training):
    """x dense channels_last but with strides of its size-1 dims that channels_last does not give them (a permuted
    buffer): the gradient is that of the same values laid out plainly (PyTorch's CPU batch_norm backward alone
    gets it wrong)."""
    torch.manual_seed(0)
    plain = torch.randn(1, 3, 2, 1)
    odd = plain.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    assert odd.stride() == (3, 1, 3, 3) and torch.equal(odd, plain)
    grad = torch.randn(1, 3, 2, 1)
    mean, var = torch.randn(3) * 0.1, torch.rand(3) + 0.5
    grads = []
    for x in (plain, odd):
        x = x.detach().requires_grad_(True)
        y = ops.bn_mish(x, None, None, mean.clone(), var.clone(), training, 0.1, 0.5, backend="reference")
        grads.append(torch.autograd.grad(y, x, grad)[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_bn_mish_out_writes_channel_slice():
    x = torch.randn(2, 3, 4, 4)
    buf = torch.full((2, 7, 4, 4), float("nan"))
    y = ops.bn_mish(x, None, None, None, None, True, out=buf[:, 2:5])
    assert y.data_ptr() == buf[:, 2:5].data_ptr()
    assert torch.isnan(buf[:, :2]).all() and torch.isnan(buf[:, 5:]).all()
    torch.testing.assert_close(buf[:, 2:5], F.mish(F.batch_norm(x, None, None, training=True)))


def test_fold_bn_matches_conv_then_bn():
    from cspmirror import fold_bn

    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True).double()
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    w, b = fold_bn(conv, bn)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)))
    torch.testing.assert_close(ops.conv_bn_mish(x, w, b), F.mish(bn(conv(x))))
