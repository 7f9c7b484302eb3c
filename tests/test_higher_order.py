"""Beyond one backward: gradients of gradients (``create_graph=True``, e.g. a gradient penalty), ``torch.func``
transforms, and the recomputed conv input next to ``torch.utils.checkpoint``, on the fast backends against the
reference."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from helpers import fast_backend_or_skip, randomize_bn, rel_err, triton_or_skip
from torch.utils.checkpoint import checkpoint

import cspmirror
from cspmirror.layers import BatchNormMish2d, ConvBNMish, MirrorSplit, MishedDenseBlock

SHAPE = (2, 4, 5, 6)


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
    fast_backend_or_skip(backend)
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


def _fuse_grads(backend: str, p: torch.Tensor, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The parts' gradients of a fuse for the output gradient ``u``, recorded (a double backward)."""
    y = cspmirror.ops.mirror_fuse([p, q], 7, reduce="mean", backend=backend)
    return torch.cat(torch.autograd.grad(y, [p, q], u, create_graph=True), dim=1)


VMAPPED = {  # op: (function of the backend and the inputs, input shapes)
    "mirror_split": (lambda b, x: cspmirror.ops.mirror_split(x, backend=b), [(2, 3, 4, 7)]),
    "mirror_fuse": (lambda b, p, q: cspmirror.ops.mirror_fuse([p, q], 7, reduce="mean", backend=b),
                    [(4, 2, 4, 5), (4, 1, 4, 5)]),
    "mirror_fuse_grads": (_fuse_grads, [(4, 2, 4, 5), (4, 1, 4, 5), (2, 3, 4, 7)]),
    "bn_mish": (lambda b, x, w: cspmirror.ops.bn_mish(x, w, None, None, None, True, backend=b), [(2, 3, 2, 3), (3,)]),
}


@pytest.mark.parametrize("how", ["is_grads_batched", "jacobian"])
@pytest.mark.parametrize("op,backend", [  # (the extension's bn_mish ran: vmap loops over its tensor-only ops)
    *((op, backend) for op in VMAPPED if op != "bn_mish" for backend in ("triton", "extension")),
    ("bn_mish", "triton"),
])
def test_vmapped_backward_matches_reference(op, backend, how):
    """torch.autograd.grad(..., is_grads_batched=True) and torch.autograd.functional.jacobian(..., vectorize=True)
    run the backward under vmap: the fast backends give the reference's gradients, the mirror ops' exactly (was an
    error: the mirror ops' lists of tensors have no vmap fallback, and Triton's kernels were handed vmap's
    batched tensors)."""
    fast_backend_or_skip(backend)
    fn, shapes = VMAPPED[op]
    inputs = [torch.randn(shape) for shape in shapes]

    def grads(backend: str) -> tuple[torch.Tensor, ...]:
        leaves = [t.clone().requires_grad_() for t in inputs]
        if how == "jacobian":
            return torch.autograd.functional.jacobian(lambda *t: fn(backend, *t), tuple(leaves), vectorize=True)
        y = fn(backend, *leaves)
        batch = torch.randn(3, *y.shape, generator=torch.Generator().manual_seed(1))
        return torch.autograd.grad(y, leaves, batch, is_grads_batched=True, allow_unused=True)

    for want, have in zip(grads("reference"), grads(backend), strict=True):
        if op == "bn_mish":
            assert rel_err(have, want) <= 1e-4
        else:
            assert (have is None and want is None) or torch.equal(have, want)


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

    fast_backend_or_skip(backend)
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


@pytest.mark.parametrize("backend", ["reference", "triton", "extension"])
def test_torch_func_vmap_of_the_ops(backend):
    """torch.func.vmap over a chain of every op, and per-sample gradients (vmap of torch.func.grad), give what a
    loop over the samples gives (was "NYI: querying is_contiguous inside of vmap" on every backend, the reference
    included: the ops asked their inputs' memory format)."""
    if backend != "reference":
        fast_backend_or_skip(backend)
    torch.manual_seed(0)
    samples = torch.randn(3, *SHAPE)  # three samples, each a batch of the ops' [N, C, H, W]
    bn_weight, conv_weight = torch.randn(SHAPE[1]), torch.randn(3, SHAPE[1], 3, 3)

    def chain(x: torch.Tensor) -> torch.Tensor:
        parts = cspmirror.ops.mirror_split(x, backend=backend)
        h = cspmirror.ops.bn_mish(parts, bn_weight, None, None, None, True, backend=backend)
        h = cspmirror.ops.mirror_fuse([h], SHAPE[-1], reduce="mean", backend=backend)
        return cspmirror.ops.conv_bn_mish(h, conv_weight, None, backend=backend)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return chain(x).square().sum()

    looped = torch.stack([chain(x) for x in samples])
    assert torch.allclose(torch.func.vmap(chain)(samples), looped, rtol=1e-5, atol=1e-5)
    looped_grads = torch.stack([torch.func.grad(loss)(x) for x in samples])
    assert torch.allclose(torch.func.vmap(torch.func.grad(loss))(samples), looped_grads, rtol=1e-4, atol=1e-4)
