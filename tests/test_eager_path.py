"""The eager fast path of the Triton ops (cspmirror/ops/_eager.py): taken in plain eager mode, the registered
custom op everywhere else; same results, gradients and in-place semantics either way."""

from __future__ import annotations

import pytest
import torch
from helpers import triton_or_skip
from torch.utils._python_dispatch import TorchDispatchMode

from cspmirror import ops

triton_or_skip()

from cspmirror.ops import triton_bn_mish, triton_conv, triton_mirror  # noqa: E402  (imports triton)


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _forbid(monkeypatch: pytest.MonkeyPatch, eager_op) -> None:
    def registered(*args):
        raise AssertionError("the registered op ran in plain eager mode")
    monkeypatch.setattr(eager_op, "op", registered)


def test_plain_eager_skips_the_registered_ops(monkeypatch, device):
    for eager_op in (triton_mirror._split, triton_mirror._fuse, triton_bn_mish._train, triton_bn_mish._train_out,
                     triton_bn_mish._apply, triton_bn_mish._apply_out,
                     triton_bn_mish._backward_fused, triton_conv._conv, triton_conv._conv_out):
        _forbid(monkeypatch, eager_op)
    x = torch.randn(2, 4, 3, 6, device=device, requires_grad=True)
    y = ops.mirror_split(x, backend="triton")
    z = ops.mirror_fuse([y], 6, backend="triton")
    w = torch.ones(4, device=device, requires_grad=True)
    out = ops.bn_mish(z, w, None, torch.zeros(4, device=device), torch.ones(4, device=device), True,
                      backend="triton")
    out.sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = ops.bn_mish(ops.mirror_fuse([ops.mirror_split(x_ref, backend="reference")], 6, backend="reference"),
                           w_ref, None, None, None, True, backend="reference")
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)  # the gradients, not only their presence
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-5)
    conv_w = torch.randn(5, 4, 3, 3, device=device)
    with torch.no_grad():
        for training in (True, False):  # the out= forms, and eval's apply
            ops.bn_mish(z, w, None, torch.zeros(4, device=device), torch.ones(4, device=device), training,
                        out=torch.empty_like(z), backend="triton")
        ops.bn_mish(z, w, None, torch.zeros(4, device=device), torch.ones(4, device=device), False,
                    backend="triton")
        y = ops.conv_bn_mish(z, conv_w, None, backend="triton")
        ops.conv_bn_mish(z, conv_w, None, out=torch.empty_like(y), backend="triton")
    torch.testing.assert_close(y, ops.conv_bn_mish(z, conv_w, None, backend="reference"), rtol=1e-4, atol=1e-4)


def test_modes_see_the_registered_ops(device):
    x = torch.randn(2, 4, 3, 6, device=device)
    with _RecordOps() as mode:
        y = ops.mirror_split(x, backend="triton")
        ops.bn_mish(y, None, None, None, None, True, backend="triton")
    assert "cspmirror.mirror_split.default" in mode.names
    assert "cspmirror.bn_mish_train_triton.default" in mode.names
    assert torch.equal(y, ops.mirror_split(x, backend="reference"))


def test_in_place_updates_bump_versions(device):
    """Like the dispatcher's: autograd must still see the running statistics and ``out=`` change."""
    x = torch.randn(2, 4, 3, 6, device=device)
    running_mean, running_var = torch.zeros(4, device=device), torch.ones(4, device=device)
    out = torch.empty_like(x)
    versions = (running_mean._version, running_var._version, out._version)
    ops.bn_mish(x, None, None, running_mean, running_var, True, out=out, backend="triton")
    assert running_mean._version > versions[0] and running_var._version > versions[1]
    assert out._version > versions[2]


class _NoGradient(torch.autograd.Function):
    """Identity whose backward gives its input no gradient."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def test_backward_fills_no_zero_gradients(device):
    """bn_mish's batch statistics get no gradient: the eager path must not fill zeros for them (a fill kernel
    per layer and step on a GPU), and a backward reached with no gradient at all gives none."""
    x = torch.randn(2, 4, 3, 6, device=device, requires_grad=True)
    w = torch.ones(4, device=device, requires_grad=True)
    running = torch.zeros(4, device=device), torch.ones(4, device=device)
    out = ops.bn_mish(x, w, None, *running, True, backend="triton")
    grad = torch.randn_like(out)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(grad)
    zeros = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zero_", "aten::fill_")]
    assert not zeros and x.grad is not None and w.grad is not None
    for backend in ("reference", "triton"):
        x.grad = w.grad = None
        out = ops.bn_mish(x, w, None, None, None, True, backend=backend)
        (_NoGradient.apply(out).sum() + w.sum()).backward()
        assert x.grad is None and torch.equal(w.grad, torch.ones_like(w)), backend
