"""Bytes autograd saves for backward: the fused (Triton) bn_mish path vs the reference, counted exactly.

The reference ConvBNMish saves three activation-size tensors (conv input, BN input, Mish input); the fused path
saves two (conv input, bn_mish input) plus fp32 [C] statistics. In a dense block the second conv does not keep
its input x1 either: its backward recomputes x1 from the first bn_mish's saved input (cspmirror.ops.recompute).
Each distinct storage counts once; parameters and buffers are not counted (they are the model, not
activations).
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn as nn
from helpers import triton_or_skip

import cspmirror
from cspmirror.layers import ConvBNMish, MishedDenseBlock

SHAPE = (2, 8, 6, 7)  # every activation below has this size, or half its channels inside a dense block
ACTIVATION = 2 * 8 * 6 * 7 * 4  # bytes of one fp32 activation of SHAPE


@pytest.fixture(autouse=True)
def _triton():
    triton_or_skip()


class SavedStorages:
    """Context manager: the distinct storages autograd saves inside it (ptr -> bytes), model state excluded."""

    def __init__(self, model: nn.Module):
        self.model_state = {t.untyped_storage().data_ptr()
                            for t in itertools.chain(model.parameters(), model.buffers())}
        self.bytes: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.model_state:
            self.bytes[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> SavedStorages:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def activations(self, nbytes: int) -> int:
        """How many saved storages have exactly ``nbytes``."""
        return sum(b == nbytes for b in self.bytes.values())


@functools.cache
def saved(kind: str, backend: str, recompute: bool | None = None) -> SavedStorages:
    """What one forward of ``build(kind)`` on ``backend`` saves (the interpreter is slow: computed once);
    ``recompute``: :func:`cspmirror.set_recompute` first, unless None (the default settings)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = cspmirror.set_backend(build(kind).to(device), backend)
    if recompute is not None:
        cspmirror.set_recompute(model, recompute)
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    with SavedStorages(model) as storages:
        y = model(x)
    y.sum().backward()  # the graph is complete and differentiable
    return storages


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "cbm_stack":
        return nn.Sequential(ConvBNMish(8, 8, 3), ConvBNMish(8, 8, 1), ConvBNMish(8, 8, 3))
    if kind == "dense_block":
        return MishedDenseBlock(8)
    # The body of a CSP branch: block_in, two dense blocks, transition.
    return nn.Sequential(ConvBNMish(8, 8, 1), MishedDenseBlock(8), MishedDenseBlock(8), ConvBNMish(8, 8, 1))


# (model, full-size activations saved by reference / fused, half-channel ones by reference / fused)
EXPECTED = {
    "cbm_stack": ((9, 6), (0, 0)),
    "dense_block": ((1, 1), (5, 2)),
    "csp_body": ((8, 6), (10, 4)),
}


@pytest.mark.parametrize("kind", ["cbm_stack", "dense_block", "csp_body"])
def test_fused_path_saves_at_most_70_percent(kind):
    ref, fused = saved(kind, "reference"), saved(kind, "triton")
    assert fused.total <= 0.7 * ref.total, f"fused saves {fused.total} B, reference {ref.total} B"


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_saved_activations_are_exactly_the_expected_ones(kind):
    """Count the activation-size storages: 3 per reference ConvBNMish, 2 per fused one."""
    (full_ref, full_fused), (half_ref, half_fused) = EXPECTED[kind]
    ref, fused = saved(kind, "reference"), saved(kind, "triton")
    assert (ref.activations(ACTIVATION), ref.activations(ACTIVATION // 2)) == (full_ref, half_ref)
    assert (fused.activations(ACTIVATION), fused.activations(ACTIVATION // 2)) == (full_fused, half_fused)
    # Nothing else of any size: the rest are fp32 [C] statistics (mean and var, 2 per bn_mish).
    small = [b for b in fused.bytes.values() if b not in (ACTIVATION, ACTIVATION // 2)]
    assert all(b <= 8 * 4 for b in small)


def test_lone_dense_block_ratio():
    """A dense block alone saves 4 of the reference's 7 half-size activations (57%): x (two halves), and the
    inputs of its two bn_mish; conv2's input x1 is recomputed in its backward, not kept."""
    ref, fused = saved("dense_block", "reference"), saved("dense_block", "triton")
    assert fused.total <= 0.7 * ref.total
    assert fused.total <= (4 / 7 + 0.01) * ref.total


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_recomputed_input_gives_the_same_gradients(layout):
    """conv2's backward on the recomputed x1 gives the very bits of the backward on the kept x1 (on the CPU;
    on a GPU up to cuDNN's own run-to-run differences), in either layout."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grads = []
    for recompute in (True, False):
        block = cspmirror.set_backend(build("dense_block").to(device), "triton").to(memory_format=layout)
        block.conv2.recompute_input = recompute
        x = torch.randn(SHAPE, device=device, generator=torch.Generator(device).manual_seed(1))
        x = x.contiguous(memory_format=layout).requires_grad_()
        grads.append(torch.autograd.grad(block(x).square().sum(), [x, *block.parameters()]))
    for a, b in zip(*grads, strict=True):
        if device == "cpu":
            assert torch.equal(a, b)
        else:  # cuDNN's weight-gradient algorithms need not be deterministic from call to call
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_set_recompute_keeps_one_activation_per_layer():
    """With recompute on everywhere, a stack of 3 ConvBNMish keeps its input and the 3 bn_mish inputs (4 of the
    reference's 9); off everywhere, a dense block keeps x1 again (3 half-size activations)."""
    on = saved("cbm_stack", "triton", True)
    assert on.activations(ACTIVATION) == 4
    off = saved("dense_block", "triton", False)
    assert (off.activations(ACTIVATION), off.activations(ACTIVATION // 2)) == (1, 3)


def test_recompute_input_skips_outputs_with_a_residual(device):
    """ConvBNMish(recompute_input=True) after a ConvBNMish that adds a residual: that input cannot be recomputed
    from the bn_mish's saved tensors (the residual is not among them); the gradients must be the kept input's."""
    torch.manual_seed(3)
    first = cspmirror.set_backend(ConvBNMish(4, 4, 1).to(device), "triton")
    second = cspmirror.set_backend(ConvBNMish(4, 4, 3).to(device), "triton")
    x = torch.randn(2, 4, 5, 6, device=device)
    residual = torch.randn(2, 4, 5, 6, device=device) * 3
    grads = []
    for recompute in (False, True):
        second.recompute_input = recompute
        y = second(first(x, residual=residual))
        grads.append(torch.autograd.grad(y.square().sum(), [*first.parameters(), *second.parameters()]))
    for kept, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, kept, rtol=1e-6, atol=1e-6)
