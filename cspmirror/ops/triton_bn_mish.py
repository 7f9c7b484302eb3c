"""Triton backend of ``bn_mish``: fused ``mish(batch_norm(x)) (+ residual)``, training and eval (SPEC §3).

``torch.library.custom_op``\\ s, so that ``torch.compile(fullgraph=True)`` keeps each call whole:

- ``cspmirror::bn_mish_train_triton(x, weight?, bias?, residual?, eps) -> (y, mean, var)``: the training
  forward, batch statistics (fp32 [C], biased variance) and output in one pipelined pair of passes (see
  :mod:`cspmirror.kernels.bn_mish`); differentiable in ``x``, weight, bias and residual (``register_autograd``;
  mean and var are not differentiable). The backward is the total derivative with respect to ``x``
  (through the statistics too), as ``native_batch_norm_backward`` does from its saved mean and invstd. It
  saves only ``x``, ``mean`` and ``var`` (plus the weight and bias parameters) and recomputes the normalized
  input and Mish' from them.
- ``cspmirror::bn_mish_train_triton_out(..., running_mean?, running_var?, momentum, out) -> (mean, var)``:
  the same, written into ``out`` (any strides, e.g. a channel slice of a larger buffer), updating the running
  statistics in the same launch. No autograd.
- ``cspmirror::bn_running_update_triton(mean, var, running_mean, running_var, momentum, count)``: the running
  statistics update, in place (declared in ``mutates_args``).
- ``cspmirror::bn_mish_apply_triton(x, mean, var, weight?, bias?, residual?, eps, training) -> y``: the
  normalization, affine, Mish and residual from given statistics (eval: the running ones); differentiable.
  With ``training=True``, ``mean`` and ``var`` must be ``x``'s batch statistics and the backward is the total
  derivative, as above. ``cspmirror::bn_mish_apply_triton_out(..., out)``: the same into ``out``, no autograd.
- ``cspmirror::bn_mish_backward_triton(dy, x, mean, var, weight?, bias?, eps, training, need_dx, need_sums)
  -> (dx, sum_g, sum_gx)``: ``sum_g`` is the bias gradient, ``sum_gx`` the weight gradient (fp32 [C]). Not
  differentiable itself (no double backward).

:func:`bn_mish` uses the ``_out`` forms only when nothing needs a gradient, and otherwise runs the functional op
and copies into ``out`` (autograd records the copy, so ``out=`` also works in training, at the cost of that
copy). Why the running statistics have an op of their own: ``register_autograd`` only accepts functional ops.
In plain eager mode, where the ops' dispatch is skipped (:mod:`._eager`), the training forward updates the
running statistics in its own launch (``_train_and_update_impl``); compiled and traced code sees the functional
op followed by ``bn_running_update_triton``. Both compute the same update, bit for bit.

float64 inputs run the reference (the kernels compute in fp32). Everything is deterministic: reductions write
per-program partials that are added in a fixed order (no floating-point atomics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cspmirror.kernels import bn_mish as kernels

from . import reference
from ._eager import EagerOp
from .recompute import under_checkpoint

_APPLY_ARGS = ("Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor? residual, float eps, "
               "bool training")


def bn_mish(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mish(batch_norm(x)) (+ residual)`` with ``nn.BatchNorm2d`` semantics; arguments already validated.

    Args:
        x: [N, C, H, W], contiguous, channels_last or any other strides.
        weight, bias: [C] or None, in x's dtype or fp32. running_mean, running_var: [C] or None; updated in
            place when ``training`` (``running = (1 - momentum) * running + momentum * stat``, unbiased var).
        training: batch statistics when True, running statistics (purely elementwise) when False.
        residual: [N, C, H, W] or None, added after Mish.
        out: [N, C, H, W] destination with any strides (e.g. a channel slice), or None.

    Returns:
        [N, C, H, W]: ``out`` when given, else a new tensor laid out like ``x`` (:func:`new_like`).
    """
    if x.dtype == torch.float64:
        return reference.bn_mish(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                 residual, out=out)
    if training:
        args = (x, weight, bias, residual, eps, running_mean, running_var, momentum)
        functional, into = _train_output, _train_out
    else:
        args = (x, running_mean, running_var, weight, bias, residual, eps, False)
        functional, into = _apply, _apply_out
    if out is None:
        return functional(*args)
    if _needs_autograd(x, weight, bias, residual, out):
        return out.copy_(functional(*args))
    into(*args, out)
    return out


def _train_output(*args) -> torch.Tensor:
    """The output of :data:`_train` (without the batch statistics)."""
    return _train(*args)[0]


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def new_like(x: torch.Tensor) -> torch.Tensor:
    """A new output laid out like ``x`` in the reference's format (:func:`~cspmirror.ops.reference.bn_memory_format`:
    NCHW for a dense ``x`` in another order than NCHW or NHWC), uninitialized: the kernels write every element
    (tests poison it). The fake implementations' outputs and ``dx`` too."""
    y = torch.empty_like(x)  # x's strides when dense, else ATen's suggested format: bn_memory_format's answer...
    if y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last):
        return y
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # ... but for a dense x in another order


def _stats_like(x: torch.Tensor, size: int | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[1] if size is None else size, dtype=torch.float32)


# --- training forward ---------------------------------------------------------------------------------------

_TRAIN_ARGS = "Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps"


def _train_impl(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                residual: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = new_like(x)
    mean, var = kernels.train_forward(x, weight, bias, residual, eps, y)
    return y, mean, var


_train_op = torch.library.custom_op("cspmirror::bn_mish_train_triton", _train_impl, mutates_args=(),
                                    schema=f"({_TRAIN_ARGS}) -> (Tensor, Tensor, Tensor)")


@_train_op.register_fake
def _(x, weight, bias, residual, eps):
    return new_like(x), _stats_like(x), _stats_like(x)


def _train_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, eps = inputs[:5]
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.eps, ctx.training, ctx.recomputable = eps, True, _recomputable(residual)
    ctx.save_for_backward(x, mean, var, weight, bias)


def _train_backward(ctx, grad: torch.Tensor, _grad_mean: torch.Tensor | None, _grad_var: torch.Tensor | None):
    """Gradients for x, weight, bias and residual; None for the rest (eps, and the running statistics and
    momentum of :func:`_train_and_update_impl`). The statistics' gradients are zeros or None (not
    differentiable)."""
    need_x, need_w, need_b, need_residual = ctx.needs_input_grad[:4]
    grad_x, grad_w, grad_b = _input_grads(ctx, grad, need_x, need_w, need_b)
    return grad_x, grad_w, grad_b, grad if need_residual else None, *[None] * (len(ctx.needs_input_grad) - 4)


_train_op.register_autograd(_train_backward, setup_context=_train_setup_context)


def _train_and_update_impl(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           residual: torch.Tensor | None, eps: float, running_mean: torch.Tensor | None,
                           running_var: torch.Tensor | None, momentum: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_train_impl`, also updating the running statistics (when given) in the same launch."""
    y = new_like(x)
    mean, var = kernels.train_forward(x, weight, bias, residual, eps, y, _running(running_mean, running_var,
                                                                                  momentum))
    return y, mean, var


def _train_and_update_ops(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          residual: torch.Tensor | None, eps: float, running_mean: torch.Tensor | None,
                          running_var: torch.Tensor | None, momentum: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same through registered ops, for torch.compile, tracing and dispatch modes: the functional
    training op (autograd needs a functional op), then the running-statistics update."""
    y, mean, var = _train_op(x, weight, bias, residual, eps)
    if running_mean is not None:
        _running_update_op(mean, var, running_mean, running_var, momentum, x.numel() // x.shape[1])
    return y, mean, var


def _running(running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float
             ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    return None if running_mean is None else (running_mean, running_var, momentum)


_RUNNING_ARGS = "Tensor(b!)? running_mean, Tensor(c!)? running_var, float momentum"


def _train_out_impl(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    residual: torch.Tensor | None, eps: float, running_mean: torch.Tensor | None,
                    running_var: torch.Tensor | None, momentum: float, out: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.train_forward(x, weight, bias, residual, eps, out, _running(running_mean, running_var, momentum))


_train_out_op = torch.library.custom_op(
    "cspmirror::bn_mish_train_triton_out", _train_out_impl, mutates_args=("running_mean", "running_var", "out"),
    schema=f"({_TRAIN_ARGS}, {_RUNNING_ARGS}, Tensor(a!) out) -> (Tensor, Tensor)",
)


@_train_out_op.register_fake
def _(x, weight, bias, residual, eps, running_mean, running_var, momentum, out):
    return _stats_like(x), _stats_like(x)


def _running_update_impl(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor,
                         running_var: torch.Tensor, momentum: float, count: int) -> None:
    kernels.update_running(mean, var, running_mean, running_var, momentum, count)


_running_update_op = torch.library.custom_op(
    "cspmirror::bn_running_update_triton", _running_update_impl, mutates_args=("running_mean", "running_var"),
    schema="(Tensor mean, Tensor var, Tensor(a!) running_mean, Tensor(b!) running_var, float momentum, "
           "SymInt count) -> ()",
)


@_running_update_op.register_fake
def _(mean, var, running_mean, running_var, momentum, count):
    return None


# --- forward from given statistics --------------------------------------------------------------------------

def _apply_impl(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, residual: torch.Tensor | None, eps: float, training: bool
                ) -> torch.Tensor:
    y = new_like(x)
    kernels.apply(x, mean, var, eps, weight, bias, residual, y)
    return y


_apply_op = torch.library.custom_op("cspmirror::bn_mish_apply_triton", _apply_impl, mutates_args=(),
                                    schema=f"({_APPLY_ARGS}) -> Tensor")


@_apply_op.register_fake
def _(x, mean, var, weight, bias, residual, eps, training):
    return new_like(x)


def _setup_context(ctx, inputs, output) -> None:
    x, mean, var, weight, bias, residual, eps, training = inputs
    ctx.eps, ctx.training, ctx.recomputable = eps, training, _recomputable(residual)
    ctx.save_for_backward(x, mean, var, weight, bias)


def _backward(ctx, grad: torch.Tensor):
    need_x, _, _, need_w, need_b, need_residual = ctx.needs_input_grad[:6]
    grad_x, grad_w, grad_b = _input_grads(ctx, grad, need_x, need_w, need_b)
    return grad_x, None, None, grad_w, grad_b, grad if need_residual else None, None, None


_apply_op.register_autograd(_backward, setup_context=_setup_context)


def _input_grads(ctx, grad: torch.Tensor, need_x: bool, need_w: bool, need_b: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients for x, weight and bias from what either forward op saved (x, mean, var, weight, bias)."""
    if not (need_x or need_w or need_b):
        return None, None, None
    x, mean, var, weight, bias = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiated in turn
        return tuple(reference.bn_mish_grads(grad, x, weight, bias, mean, var, ctx.eps, ctx.training,
                                             (need_x, need_w, need_b)))
    dx, sum_g, sum_gx = _backward_fused(grad, x, mean, var, weight, bias, ctx.eps, ctx.training, need_x,
                                        need_w or need_b)
    return (dx if need_x else None, sum_gx.to(weight.dtype) if need_w else None,
            sum_g.to(bias.dtype) if need_b else None)


def _apply_out_impl(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, residual: torch.Tensor | None, eps: float, training: bool,
                    out: torch.Tensor) -> None:
    kernels.apply(x, mean, var, eps, weight, bias, residual, out)


_apply_out_op = torch.library.custom_op("cspmirror::bn_mish_apply_triton_out", _apply_out_impl,
                                        mutates_args=("out",), schema=f"({_APPLY_ARGS}, Tensor(a!) out) -> ()")


@_apply_out_op.register_fake
def _(x, mean, var, weight, bias, residual, eps, training, out):
    return None


# --- backward -----------------------------------------------------------------------------------------------

def _backward_impl(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, training: bool,
                   need_dx: bool, need_sums: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx [N, C, H, W] (empty [0] unless ``need_dx``); sum_g, sum_gx fp32 [C] (empty [0] when neither
    ``training`` nor ``need_sums``)."""
    dx = new_like(x) if need_dx else x.new_empty(0)
    sums = kernels.backward(dy, x, mean, var, eps, weight, bias, training, dx if need_dx else None, need_sums)
    if sums is None:
        return dx, _stats_like(x, 0), _stats_like(x, 0)
    return dx, sums[0], sums[1]


_backward_op = torch.library.custom_op(
    "cspmirror::bn_mish_backward_triton", _backward_impl, mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
           "bool training, bool need_dx, bool need_sums) -> (Tensor, Tensor, Tensor)",
)


@_backward_op.register_fake
def _(dy, x, mean, var, weight, bias, eps, training, need_dx, need_sums):
    dx = new_like(x) if need_dx else x.new_empty(0)
    size = None if (training or need_sums) else 0
    return dx, _stats_like(x, size), _stats_like(x, size)


# What :func:`bn_mish` and the backward call: the registered ops, or in plain eager mode the same code without
# the custom-op dispatch (see :mod:`._eager`).
_train = EagerOp(_train_and_update_ops, _train_and_update_impl, _train_setup_context, _train_backward,
                 mutates=(5, 6))
_train_out = EagerOp(_train_out_op, _train_out_impl, mutates=(5, 6, 8))
_apply = EagerOp(_apply_op, _apply_impl, _setup_context, _backward)
_apply_out = EagerOp(_apply_out_op, _apply_out_impl, mutates=(8,))
_backward_fused = EagerOp(_backward_op, _backward_impl)


def _recomputable(residual: torch.Tensor | None) -> bool:
    """Whether a forward's output may be recomputed from what it saves (:func:`recompute_recipe`): not with a
    residual, nor inside ``torch.utils.checkpoint``, whose hooks let each saved tensor be unpacked once (this
    op's own backward unpacks them too)."""
    return residual is None and not under_checkpoint()


def recompute_recipe(y: torch.Tensor) -> Callable[[bool], torch.Tensor] | None:
    """For ``y`` exactly as the eager fast path of :func:`bn_mish` returned it (autograd recording, no
    residual, not checkpointed): a function that recomputes it bit for bit from what the op saved for its
    own backward (input, mean, var, weight, bias), with ``_apply_kernel`` (the training forward's second pass
    runs the same device code on the same fp32 statistics), or, given ``differentiable=True`` (a double
    backward), through the reference ops; None for anything else. Used by
    :func:`cspmirror.ops.recompute.conv2d_on_recomputed`."""
    node = y.grad_fn
    functions = [op.function for op in (_train, _apply) if op.function is not None]
    if (not any(isinstance(node, f._backward_cls) for f in functions) or y._base is not None
            or not node.recomputable):
        return None

    def recompute(differentiable: bool = False) -> torch.Tensor:
        x, mean, var, weight, bias = node.saved_tensors
        if differentiable:
            return reference.bn_mish_output(x, weight, bias, mean, var, node.eps, node.training)
        return _apply_impl(x, mean, var, weight, bias, None, node.eps, node.training)

    return recompute
