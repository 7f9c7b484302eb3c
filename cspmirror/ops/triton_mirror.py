"""The Triton backend of ``mirror_split`` / ``mirror_fuse`` (SPEC §1.1, §1.2, §3).

Both are ``torch.library`` custom ops, so they run under autograd, ``torch.compile(fullgraph=True)`` and
``torch.library.opcheck``. Their schemas carry two arguments the public ops do not have:

- ``reduce`` on the split: ``"mean"`` halves the overlap, which makes ``mirror_split(reduce=r)`` the adjoint
  of ``mirror_fuse(reduce=r)``. Each op's backward is then the other op (SPEC §1.2): split's is a fuse of
  the gradient with one part; fuse's is a split of each part's channel slice of the gradient.
- ``channels_last``: the output's memory format. The public functions pass the reference's choice (that of
  ``x``; for the fuse, channels_last when a part is); the backwards pass the format of the input whose gradient
  they compute (:func:`~cspmirror.ops.reference.grad_memory_format`).

Arguments arrive validated (:mod:`cspmirror.ops` validates); axis is -1 or -2.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .. import backends
from ..kernels import mirror as kernels
from . import reference
from ._eager import EagerOp, batched
from ._validate import split_width
from .reference import fuse_memory_format, grad_memory_format, memory_format_of


@functools.cache
def _triton_status(device: torch.device, interpreted: bool) -> backends.BackendStatus:
    """:func:`cspmirror.backends.triton_status`, probed once per device and interpreter setting."""
    return backends.triton_status(device)


def _require_triton(device: torch.device) -> None:
    status = _triton_status(device, backends.triton_interpreted())
    if not status.available:
        raise backends.BackendUnavailableError(f"backend='triton' cannot run here: {status.reason}")


def _is_channels_last(t: torch.Tensor) -> bool:
    return memory_format_of(t) == torch.channels_last


def _empty(shape: list[int], like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The op's output (also in the fake impls, so that real and fake strides agree for every shape)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _split_shape(x: torch.Tensor, overlap: float, axis: int) -> list[int]:
    shape = list(x.shape)
    shape[0] *= 2
    shape[axis] = split_width(shape[axis], overlap)
    return shape


def _fuse_shape(parts: Sequence[torch.Tensor], length: int, axis: int) -> list[int]:
    shape = list(parts[0].shape)
    shape[0] //= 2
    shape[1] = sum(p.shape[1] for p in parts)
    shape[axis] = length
    return shape


# ------------------------------------------------------------------------------------------- mirror_split


def _split_impl(x: torch.Tensor, overlap: float, axis: int, mirror: bool, reduce: str,
                channels_last: bool) -> torch.Tensor:
    _require_triton(x.device)
    y = _empty(_split_shape(x, overlap, axis), x, channels_last)
    length = x.shape[axis]
    kernels.split(x, y, length, split_width(length, overlap), axis, mirror, halve=reduce == "mean")
    return y


_split_op = torch.library.custom_op(
    "cspmirror::mirror_split", _split_impl, mutates_args=(),
    schema="(Tensor x, float overlap, int axis, bool mirror, str reduce, bool channels_last) -> Tensor",
)


@_split_op.register_fake
def _(x, overlap, axis, mirror, reduce, channels_last):
    return _empty(_split_shape(x, overlap, axis), x, channels_last)


def _split_setup_context(ctx, inputs, output) -> None:
    x, overlap, axis, mirror, reduce, _ = inputs
    ctx.args = (x.shape[axis], overlap, axis, mirror, reduce, grad_memory_format(x) == torch.channels_last)


def _split_backward(ctx, grad: torch.Tensor):
    length, overlap, axis, mirror, reduce, channels_last = ctx.args
    if batched(grad):  # vmap over the backward (see reference.split_adjoint)
        grad_x = reference.split_adjoint([grad], length, axis, mirror, reduce)
    else:
        grad_x = _fuse([grad], length, overlap, axis, mirror, reduce, channels_last)
    return grad_x, None, None, None, None, None


_split_op.register_autograd(_split_backward, setup_context=_split_setup_context)


# -------------------------------------------------------------------------------------------- mirror_fuse


def _fuse_impl(parts: list[torch.Tensor], length: int, overlap: float, axis: int, mirror: bool, reduce: str,
               channels_last: bool) -> torch.Tensor:
    first = parts[0]
    _require_triton(first.device)
    out = _empty(_fuse_shape(parts, length, axis), first, channels_last)
    width = split_width(length, overlap)
    start = 0
    for part in parts:
        channels = part.shape[1]
        kernels.fuse_part(part, out.narrow(1, start, channels), length, width, axis, mirror,
                          mean=reduce == "mean")
        start += channels
    return out


# length is a SymInt, as sizes passed to an op must be: with int, torch.compile recompiles for every new width.
_fuse_op = torch.library.custom_op(
    "cspmirror::mirror_fuse", _fuse_impl, mutates_args=(),
    schema="(Tensor[] parts, SymInt length, float overlap, int axis, bool mirror, str reduce, bool channels_last) "
           "-> Tensor",
)


@_fuse_op.register_fake
def _(parts, length, overlap, axis, mirror, reduce, channels_last):
    return _empty(_fuse_shape(parts, length, axis), parts[0], channels_last)


def _fuse_setup_context(ctx, inputs, output) -> None:
    parts, _, overlap, axis, mirror, reduce, _ = inputs
    ctx.channels = [p.shape[1] for p in parts]
    ctx.channels_last = [grad_memory_format(p) == torch.channels_last for p in parts]
    ctx.args = (overlap, axis, mirror, reduce)


def _fuse_backward(ctx, grad: torch.Tensor):
    overlap, axis, mirror, reduce = ctx.args
    if batched(grad):  # vmap over the backward (see reference.split_adjoint)
        grads = reference.fuse_adjoint(grad, ctx.channels, split_width(grad.shape[axis], overlap), axis, mirror,
                                       reduce)
        return grads, None, None, None, None, None, None
    grads, start = [], 0
    for channels, channels_last in zip(ctx.channels, ctx.channels_last, strict=True):
        grads.append(_split(grad.narrow(1, start, channels), overlap, axis, mirror, reduce, channels_last))
        start += channels
    return grads, None, None, None, None, None, None


_fuse_op.register_autograd(_fuse_backward, setup_context=_fuse_setup_context)

# What the public functions and the backwards call: the registered ops, or in plain eager mode the same code
# without the custom-op dispatch (see :mod:`._eager`).
_split = EagerOp(_split_op, _split_impl, _split_setup_context, _split_backward)
_fuse = EagerOp(_fuse_op, _fuse_impl, _fuse_setup_context, _fuse_backward)


# ------------------------------------------------------------------------------------------ public entry


def mirror_split(x: torch.Tensor, overlap: float = 0.25, axis: int = -1, mirror: bool = True) -> torch.Tensor:
    """Triton ``mirror_split``: x [N, C, H, W] -> [2N, C, H, P] (axis=-1), in x's memory format.

    Raises :class:`cspmirror.backends.BackendUnavailableError` when Triton cannot run on x's device.
    """
    return _split(x, overlap, axis, mirror, "sum", _is_channels_last(x))


def mirror_fuse(parts: Sequence[torch.Tensor], length: int, overlap: float = 0.25, axis: int = -1,
                mirror: bool = True, reduce: str = "sum") -> torch.Tensor:
    """Triton ``mirror_fuse``: parts [2N, C_i, H, P] -> [N, sum(C_i), H, length] (axis=-1), channels_last when a
    part is (:func:`~cspmirror.ops.reference.fuse_memory_format`).

    Raises :class:`cspmirror.backends.BackendUnavailableError` when Triton cannot run on the parts' device.
    """
    parts = list(parts)
    return _fuse(parts, length, overlap, axis, mirror, reduce, fuse_memory_format(parts) == torch.channels_last)


__all__ = ["mirror_split", "mirror_fuse"]
