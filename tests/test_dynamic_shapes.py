"""Symbolic sizes: ``torch.compile(dynamic=True)`` and ``torch.export`` with dynamic batch and spatial dimensions.

A size that an op takes as an argument (``mirror_fuse``'s length, the split width, the count of values behind the
running statistics) is a ``SymInt`` in each registered op's schema: with ``int`` there, Dynamo specialized the
graph on its value, so that every new width (and, in training, every new batch) compiled the model again, and
``torch.export`` kept the example's width; the public wrappers take a symbolic length too.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from cspmirror import ops
from cspmirror.backends import BackendUnavailableError

FAST = ["extension", "triton"]
SHAPES = [(2, 3, 4, 7), (3, 3, 5, 9), (4, 3, 4, 11)]  # new batch, height and width each time (no size 1)


def _backend_or_skip(backend: str) -> None:
    try:
        for op in ("mirror_split", "mirror_fuse", "bn_mish"):
            ops.implementation(op, backend, torch.device("cpu"))  # (also warms the look-up that compile needs)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


def _step(x, weight, bias, running_mean, running_var, backend):
    """Split, training bn_mish (running statistics updated), fuse: every op that takes a size."""
    p = ops.mirror_split(x, 0.25, -1, True, backend=backend)
    y = ops.bn_mish(p, weight, bias, running_mean, running_var, True, 0.1, 1e-5, backend=backend)
    return ops.mirror_fuse([y, p], x.shape[-1], 0.25, -1, True, "sum", backend=backend)


def _inputs(shape: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two copies of x (requiring grad), weight, bias, running mean and running variance."""
    values = [torch.randn(shape), torch.rand(3) + 0.5, torch.randn(3), torch.zeros(3), torch.ones(3)]
    return tuple([t.clone().requires_grad_(i == 0) for i, t in enumerate(values)] for _ in range(2))


@pytest.mark.parametrize("backend", FAST)
def test_compile_dynamic_compiles_once_for_every_size(backend):
    """One graph for every batch, height and width (it was one per width, and per batch in training), forward
    and backward, with the eager reference's values and running statistics."""
    _backend_or_skip(backend)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_step, backend=counter, fullgraph=True, dynamic=True)
    for shape in SHAPES:
        got, expected = _inputs(shape)
        out, ref = compiled(*got, backend), _step(*expected, "reference")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        (grad,), (ref_grad,) = (torch.autograd.grad(o.square().sum(), i[0]) for o, i in ((out, got), (ref, expected)))
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
        for stat, ref_stat in zip(got[3:], expected[3:], strict=True):
            torch.testing.assert_close(stat, ref_stat, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


class _SplitFuse(torch.nn.Module):
    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = ops.mirror_split(x, 0.25, -1, True, backend=self.backend)
        return ops.mirror_fuse([p * 2.0], x.shape[-1], 0.25, -1, True, "mean", backend=self.backend)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_export_with_dynamic_spatial_sizes(backend):
    """``torch.export`` (non-strict, its default) with symbolic height and width: the reference refused the
    symbolic length ('length must be an int, got SymInt'), the fast ops' programs kept the example's width."""
    _backend_or_skip(backend)
    module = _SplitFuse(backend)
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = torch.export.export(module, (torch.randn(SHAPES[0]),), dynamic_shapes=(dims,))
    for shape in SHAPES:
        x = torch.randn(shape)
        assert torch.equal(program.module()(x), _SplitFuse("reference")(x)), shape
