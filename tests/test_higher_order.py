"""Beyond one backward: gradients of gradients (``create_graph=True``, e.g. a gradient penalty), ``torch.func``
transforms, and the recomputed conv input next to ``torch.utils.checkpoint``, on the fast backends against the
reference."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from helpers import randomize_bn, rel_err, triton_or_skip
from torch.utils.checkpoint import checkpoint

import cspmirror
from cspmirror.layers import BatchNormMish2d, ConvBNMish, MirrorSplit, MishedDenseBlock

SHAPE = (2, 4, 5, 6)


def _backend_or_skip(backend: str) -> None:
    if backend == "triton":
        triton_or_skip()
    else:
        from cspmirror.ops import extension

        if not extension.status().available:
            pytest.skip(extension.status().reason)


def _module(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bn_mish":
        return randomize_bn(BatchNormMish2d(SHAPE[1]))
    if kind == "conv_bn_mish":
        return cspmirror.fuse_for_inference(randomize_bn(ConvBNMish(SHAPE[1], 6, 3)))
    return randomize_bn(MishedDenseBlock(SHAPE[1]))  # its second conv recomputes its input (Triton)


def _penalty_grads(module: torch.nn.Module, x: torch.Tensor, of: str) -> list[torch.Tensor | None]:
    """The gradients (input's, then the parameters') of a penalty on the gradients of ``sum(module(x) * w)``
    with respect to ``of``: the input (a gradient penalty) or the parameters (as meta-learning does)."""
    x = x.clone().requires_grad_()
    y = module(x)
    weights = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    params = list(module.parameters())
    grads = torch.autograd.grad((y * weights).sum(), [x] if of == "input" else params, create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    return [x.grad, *(p.grad for p in params)]


@pytest.mark.parametrize("backend", ["triton", "extension"])
@pytest.mark.parametrize("kind,training,of", [
    ("bn_mish", True, "input"), ("bn_mish", False, "input"), ("bn_mish", True, "params"),
    ("conv_bn_mish", False, "input"), ("conv_bn_mish", False, "params"),
    ("dense_block", True, "input"), ("dense_block", True, "params"),  # (recomputed conv input: params)
])
def test_double_backward_matches_reference(backend, kind, training, of):
    """Every tensor gets the reference's gradient of the penalty (the fast backwards used to return gradients
    that autograd could not differentiate: silently None or partial)."""
    _backend_or_skip(backend)
    module = _module(kind).train(training)
    x = torch.randn(SHAPE)
    expected = _penalty_grads(cspmirror.set_backend(copy.deepcopy(module), "reference"), x, of)
    got = _penalty_grads(cspmirror.set_backend(module, backend), x, of)
    names = ["input", *(n for n, _ in module.named_parameters())]
    for name, want, have in zip(names, expected, got, strict=True):
        assert want is not None and have is not None, name
        assert rel_err(have, want) <= 1e-4, name


@pytest.mark.parametrize("kind", ["bn_mish_eval", "mirror_split"])
def test_torch_func_grad_runs_the_reference(kind):
    """Under torch.func transforms the fast backends run the reference (their autograd has no functorch
    rules): the same gradients as the reference backend."""
    triton_or_skip()
    torch.manual_seed(0)
    module = randomize_bn(BatchNormMish2d(SHAPE[1])).eval() if kind == "bn_mish_eval" else MirrorSplit()
    x = torch.randn(SHAPE, requires_grad=kind == "mirror_split")

    def grads(backend: str) -> dict[str, torch.Tensor] | torch.Tensor:
        model = cspmirror.set_backend(copy.deepcopy(module), backend)
        if kind == "mirror_split":
            return torch.func.grad(lambda t: (model(t) ** 2).sum())(x)
        params = dict(model.named_parameters())
        loss: Callable = lambda p: torch.func.functional_call(model, p, (x,)).square().sum()  # noqa: E731
        return torch.func.grad(loss)(params)

    expected, got = grads("reference"), grads("triton")
    if kind == "mirror_split":
        assert torch.equal(got, expected)
    else:
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_recomputed_input_next_to_a_checkpointed_producer():
    """A conv that recomputes its input from a bn_mish run inside torch.utils.checkpoint (whose saved tensors
    unpack once) keeps its input instead: the backward runs and matches the reference."""
    triton_or_skip()
    torch.manual_seed(0)
    first, second = ConvBNMish(SHAPE[1], 4, 1), ConvBNMish(4, 4, 3, recompute_input=True)
    x = torch.randn(SHAPE)

    def grads(backend: str) -> list[torch.Tensor]:
        a, b = (cspmirror.set_backend(copy.deepcopy(m), backend) for m in (first, second))
        x_leaf = x.clone().requires_grad_()
        h = checkpoint(a, x_leaf, use_reentrant=False)
        b(h).square().sum().backward()
        return [x_leaf.grad, *(p.grad for p in (*a.parameters(), *b.parameters()))]

    for want, have in zip(grads("reference"), grads("triton"), strict=True):
        assert rel_err(have, want) <= 1e-4


@pytest.mark.parametrize("backend", ["triton", "extension"])
def test_forward_ad_runs_the_reference(backend):
    """Forward-mode AD (torch.autograd.forward_ad) through a fast backend gives the reference's tangent: the fast
    ops have no jvp, and used to return their output without one (tangent None, silently)."""
    import torch.autograd.forward_ad as fwAD

    _backend_or_skip(backend)
    torch.manual_seed(0)
    x, t = torch.randn(SHAPE), torch.randn(SHAPE)
    w, b, rm, rv = torch.randn(SHAPE[1]), torch.randn(SHAPE[1]), torch.randn(SHAPE[1]), torch.rand(SHAPE[1]) + 0.5

    def tangent(backend: str) -> torch.Tensor | None:
        with fwAD.dual_level():
            y = cspmirror.ops.mirror_split(fwAD.make_dual(x, t), backend=backend)
            y = cspmirror.ops.bn_mish(y, w, b, rm.clone(), rv.clone(), False, backend=backend)
            return fwAD.unpack_dual(y).tangent

    expected, got = tangent("reference"), tangent(backend)
    assert got is not None and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
