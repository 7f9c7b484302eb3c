"""A convolution that does not keep its input for backward when that input can be recomputed.

``conv2d(x, w)`` saves ``x`` for its weight gradient. When ``x`` is the output of a fused ``bn_mish`` (Triton
backend, eager, no residual), the ``bn_mish`` node already keeps everything ``x`` is made from: its input,
batch mean and variance, weight and bias. :func:`conv2d_on_recomputed` then saves nothing of ``x``: its
backward recomputes ``x`` bit for bit with the same kernel from what ``bn_mish`` kept, one elementwise pass,
before ``bn_mish``'s own backward frees it (the engine runs the conv's backward first: ``x`` feeds it).
This is the issue's "recompute the activation inside the next conv's backward": a dense block then keeps 4 of
the reference's 7 half-size activations instead of 5.

:func:`input_recipe` says whether an input can be recomputed (never for another backend, a view, a residual
sum, ``torch.compile``, tracing, without autograd or inside ``torch.utils.checkpoint``); callers run their plain
convolution otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._eager import plain_eager


def input_recipe(x: torch.Tensor) -> Callable[[bool], torch.Tensor] | None:
    """How to recompute ``x`` from what its producer saved for its own backward, or None (also whenever
    autograd is off or the call is not plain eager: compile, tracing, fake tensors, dispatch modes)."""
    if not (isinstance(x, torch.Tensor) and torch.is_grad_enabled() and plain_eager([x]) and x.requires_grad
            and x.grad_fn is not None) or under_checkpoint():  # (FX tracing passes proxies)
        return None
    triton_bn_mish = sys.modules.get(f"{__package__}.triton_bn_mish")  # loaded if x can have come from it
    return None if triton_bn_mish is None else triton_bn_mish.recompute_recipe(x)


def under_checkpoint() -> bool:
    """Whether ``torch.utils.checkpoint``'s saved-tensor hooks are on (its forward or its recomputation): they
    let each saved tensor be unpacked once, which a recipe and ``bn_mish``'s backward cannot share, and the
    region keeps no activation anyway."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # private; torch >= 2.0
    hooks = top(False) if top is not None else None
    return hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"


def conv2d_on_recomputed(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                         recipe: Callable[[bool], torch.Tensor]) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding)`` (x [N, C_in, H, W], weight [C_out, C_in, k, k]) whose
    backward gets ``x`` back from ``recipe`` (see :func:`input_recipe`) instead of keeping it."""
    return _ConvOnRecomputed.apply(x, weight, stride, padding, recipe)


class _ConvOnRecomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, padding, recipe):
        device = x.device.type
        # Under autocast, conv2d runs in the autocast dtype: cast as autocast would, and keep the cast weight
        # (what conv2d's own backward would keep) and the dtype to cast the recomputed x to.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        weight = weight.to(dtype)
        ctx.stride, ctx.padding, ctx.recipe, ctx.dtype = stride, padding, recipe, dtype
        ctx.save_for_backward(weight)
        with torch.autocast(device, enabled=False):
            return F.conv2d(x.to(dtype), weight, None, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        # create_graph=True (a double backward): x recomputed through the reference ops, which record it
        x = ctx.recipe(torch.is_grad_enabled()).to(ctx.dtype)
        need_x, need_w = ctx.needs_input_grad[:2]
        # The very call conv2d's own backward makes, on the real x and weight: torch.nn.grad.conv2d_input /
        # conv2d_weight pass a stride-0 stand-in for one of them, and the backend then picks its algorithm (and
        # layout: NCHW for a channels_last model) from that, with another rounding than the reference's. The
        # engine casts each gradient to its input's dtype, as for autocast's own casts.
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, (ctx.stride,) * 2, (ctx.padding,) * 2, (1, 1), False, (0, 0), 1,
            (need_x, need_w, False))
        return grad_x, grad_w, None, None, None
