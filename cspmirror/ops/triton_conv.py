"""Triton backend of ``conv_bn_mish`` (inference conv with BN folded in, SPEC §3).

Two paths compute ``mish(conv2d(x, weight, bias, stride, padding=k//2)) (+ residual)``:

- ``"triton"``: one implicit-GEMM kernel with the bias / Mish / residual epilogue fused
  (:func:`cspmirror.kernels.conv.conv_mish`);
- ``"cudnn"``: ``F.conv2d`` (cuDNN on CUDA) without bias, then one Triton elementwise kernel for
  ``mish(y + bias) (+ residual)`` written straight into the output (:func:`cspmirror.kernels.conv.mish_epilogue`).

``path="auto"`` (the default) picks per shape: on CUDA, the first call with a new shape times both paths once
(``triton.testing.do_bench``) and caches the winner; under the Triton interpreter the implicit GEMM always
runs, so the tests cover it. Force a path with the ``path`` argument or the ``CSPMIRROR_CONV_PATH``
environment variable (``auto`` | ``triton`` | ``cudnn``, read at call time; the argument wins). float64, and
outputs of 2^31 pixels or more, always take the ``cudnn`` path (its epilogue runs in fp64 for fp64).

Layout: ``x`` is read in place when its channel stride is 1 (channels_last, or a channel slice of such a
buffer), else converted to channels_last on entry; a new output is channels_last whatever the input's format
(so a fused model converts once, at its first layer). ``residual`` and ``out`` may
have any strides, e.g. ``out`` a channel slice of a larger buffer.

Precision: fp16 / bf16 multiply on tensor cores with fp32 accumulation; fp32 follows PyTorch's cuDNN-conv TF32
setting (``torch.backends.cudnn.conv.fp32_precision``, or ``torch.backends.cudnn.allow_tf32`` on older torch):
TF32 when it is on (PyTorch's default for convolutions), exact fp32 (``input_precision="ieee"``) when it is off.

Both ops are ``torch.library.custom_op``\\ s (``cspmirror::conv_bn_mish``, and ``cspmirror::conv_bn_mish_out``
for ``out=``), so they compile with ``torch.compile(fullgraph=True)``. The functional op has a backward
(recomputed through PyTorch's conv); the ``out=`` form has none: where a gradient is needed, the functional op runs
and its result is copied into ``out`` (autograd records the copy).
"""

import os

import torch
import torch.nn.functional as F

from cspmirror.kernels import conv as kernels
from cspmirror.kernels.launch import on_device

from .. import backends
from . import reference
from ._eager import EagerOp
from ._flop_counts import register_conv_flops
from ._validate import conv_output_shape

PATHS = ("auto", "triton", "cudnn")
PATH_ENV = "CSPMIRROR_CONV_PATH"


def conv_bn_mish(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int = 1,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """``mish(conv2d(x, weight, bias, stride, padding=k//2)) (+ residual)``, arguments already validated.

    Args:
        x: [N, C_in, H, W]. weight: [C_out, C_in, k, k], k in (1, 3). bias: [C_out] or None.
        stride: 1 or 2. residual: [N, C_out, H_out, W_out] or None, added after Mish.
        out: [N, C_out, H_out, W_out] destination with any strides (e.g. a channel slice), or None.
        path: "auto" | "triton" | "cudnn" (see the module docstring); None means "auto".

    Returns:
        [N, C_out, H_out, W_out]: ``out`` when given, else a new channels_last tensor.
    """
    path = check_path("auto" if path is None else path, "path")
    if out is None:
        return _conv(x, weight, bias, stride, residual, path)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, residual, out)):
        return out.copy_(_conv(x, weight, bias, stride, residual, path))  # autograd records the copy
    _conv_out(x, weight, bias, stride, residual, out, path)
    return out


def check_path(path: str, name: str) -> str:
    if path not in PATHS:
        raise ValueError(f"{name} must be one of {PATHS}, got {path!r}")
    return path


def choose_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                residual: torch.Tensor | None, path: str = "auto") -> str:
    """The path ("triton" or "cudnn") that runs this call; "auto" consults the environment, then the
    per-shape timing cache (filled on first use on CUDA)."""
    if path == "auto":
        path = check_path(os.environ.get(PATH_ENV, "auto"), PATH_ENV)
    n, _, h_out, w_out = conv_output_shape(x.shape, weight.shape, stride)
    if x.dtype == torch.float64 or n * h_out * w_out >= kernels.MAX_GEMM_ROWS:
        return "cudnn"
    if path != "auto":
        return path
    if x.device.type != "cuda" or backends.triton_interpreted():
        return "triton"
    key = (x.device, x.dtype, tuple(x.shape), tuple(weight.shape), stride, bias is not None,
           residual is not None, _allow_tf32())
    choice = _PATH_CHOICES.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():  # no timing inside a CUDA graph capture
            return "triton"
        choice = _PATH_CHOICES[key] = _fastest_path(x, weight, bias, stride, residual)
    return choice


def clear_caches() -> None:
    """Forget the per-shape path choices."""
    _PATH_CHOICES.clear()


# (device, dtype, x shape, weight shape, stride, has bias, has residual, tf32) -> "triton" | "cudnn"
_PATH_CHOICES: dict[tuple, str] = {}


def _fastest_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                  residual: torch.Tensor | None) -> str:
    from triton.testing import do_bench

    x = _kernel_input(x)
    scratch = _new_output(x, weight, stride)  # never the caller's out, which may alias residual
    # do_bench times with events on the current device (and synchronizes and flushes the L2 there)
    with on_device(x.device):
        times = {
            name: do_bench(lambda run=run: run(x, weight, bias, stride, residual, scratch), warmup=5, rep=25)
            for name, run in _RUNNERS.items()
        }
    return min(times, key=times.get)


def _allow_tf32() -> bool:
    """PyTorch's TF32 choice for cuDNN convolutions (new ``fp32_precision`` API first, then the legacy flag)."""
    cudnn = torch.backends.cudnn
    for holder in (getattr(cudnn, "conv", None), cudnn, torch.backends):
        precision = getattr(holder, "fp32_precision", None)
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
        if precision is None:
            break  # this torch has no fp32_precision API
    else:
        return False  # every level says "none": full fp32
    try:
        return bool(cudnn.allow_tf32)
    except RuntimeError:  # legacy flag unreadable when the two APIs were mixed
        return False


# --- the weight as both paths read it -----------------------------------------------------------------------

def _channels_last_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as dense channels_last, the form both paths read (the implicit GEMM's ``[C_out, K]``
    operand): as it is when it already is, else a copy per call, as cuDNN makes for a channels_last input.
    Not cached: a write through ``weight.data`` (EMA updates, weight loading) changes no version counter, so
    no cache could tell that a copy went stale. ``model.to(memory_format=torch.channels_last)`` makes a
    model's conv weights channels_last, and its calls copy nothing."""
    return weight.detach().contiguous(memory_format=torch.channels_last)


# --- the two paths ------------------------------------------------------------------------------------------

def _run_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                residual: torch.Tensor | None, out: torch.Tensor) -> None:
    kernels.conv_mish(x, _channels_last_weight(weight), bias, residual, out, stride, tf32=_allow_tf32())


def _run_cudnn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
               residual: torch.Tensor | None, out: torch.Tensor) -> None:
    y = F.conv2d(x, _channels_last_weight(weight), None, stride, weight.shape[-1] // 2)
    kernels.mish_epilogue(y, bias, residual, out)


_RUNNERS = {"triton": _run_triton, "cudnn": _run_cudnn}


def _new_output(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    return torch.empty(conv_output_shape(x.shape, weight.shape, stride), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit channel stride (channels_last, or a channel slice of such a buffer), copied only
    when it is not."""
    if x.shape[1] > 1 and x.stride(1) != 1:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _provably_disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when views ``a`` and ``b`` of one storage share no element for sure (False: they may).

    Proves it for views with equal strides that form a proper mixed radix (each stride exceeds the span of
    the smaller-stride dimensions over both views), e.g. two channel slices of one buffer: element
    offsets then determine coordinates, and boxes that are apart in one dimension share nothing.
    """
    if a.stride() != b.stride() or min(a.stride()) <= 0:
        return False
    order = sorted(range(a.dim()), key=a.stride)  # smallest stride first
    starts = []
    for t in (a, b):
        rest, start = t.storage_offset(), {}
        for d in reversed(order):
            start[d], rest = divmod(rest, t.stride(d))
        if rest:
            return False
        starts.append(start)
    span = 0
    for inner, outer in zip(order, order[1:], strict=False):
        span += max(start[inner] + t.shape[inner] - 1 for start, t in zip(starts, (a, b), strict=True)) \
            * a.stride(inner)
        if span >= a.stride(outer):
            return False
    sa, sb = starts
    return any(sa[d] + a.shape[d] <= sb[d] or sb[d] + b.shape[d] <= sa[d] for d in order)


def _may_overlap(out: torch.Tensor, *others: torch.Tensor | None) -> bool:
    ptr = out.untyped_storage().data_ptr()
    return any(t is not None and t.untyped_storage().data_ptr() == ptr and not _provably_disjoint(out, t)
               for t in others)


def _forward_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                  residual: torch.Tensor | None, out: torch.Tensor, path: str) -> None:
    if _may_overlap(out, x, weight, bias, residual):
        # The GEMM reads x across tiles while others write, and timing/autotuning re-runs the kernel (an out
        # that is the residual would add it twice): compute aside, then copy. Disjoint slices of one buffer
        # (e.g. the two halves of a dense block's output) need no copy.
        result = _new_output(x, weight, stride)
        _forward_into(x, weight, bias, stride, residual, result, path)
        out.copy_(result)
        return
    x = _kernel_input(x)
    _RUNNERS[choose_path(x, weight, bias, stride, residual, path)](x, weight, bias, stride, residual, out)


# --- op registration ----------------------------------------------------------------------------------------

def _conv_bn_mish_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                       residual: torch.Tensor | None, path: str) -> torch.Tensor:
    out = _new_output(x, weight, stride)
    _forward_into(x, weight, bias, stride, residual, out, path)
    return out


_conv_bn_mish_op = torch.library.custom_op(
    "cspmirror::conv_bn_mish", _conv_bn_mish_impl, mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, int stride, Tensor? residual, str path) -> Tensor",
)


@_conv_bn_mish_op.register_fake
def _(x, weight, bias, stride, residual, path):
    return _new_output(x, weight, stride)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride, residual, _ = inputs
    ctx.stride = stride
    ctx.save_for_backward(x, weight, bias)


def _backward(ctx, grad: torch.Tensor):
    """Recompute ``mish(conv2d(...))`` through PyTorch and differentiate it (twice too); d/d residual is
    ``grad``."""
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_w, grad_b = reference.conv_bn_mish_grads(grad, x, weight, bias, ctx.stride,
                                                          ctx.needs_input_grad[:3])
    grad_res = grad if ctx.needs_input_grad[4] else None
    return grad_x, grad_w, grad_b, None, grad_res, None


_conv_bn_mish_op.register_autograd(_backward, setup_context=_setup_context)


def _conv_bn_mish_out_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                           residual: torch.Tensor | None, out: torch.Tensor, path: str) -> None:
    _forward_into(x, weight, bias, stride, residual, out, path)


_conv_bn_mish_out_op = torch.library.custom_op(
    "cspmirror::conv_bn_mish_out", _conv_bn_mish_out_impl, mutates_args=("out",),
    schema="(Tensor x, Tensor weight, Tensor? bias, int stride, Tensor? residual, Tensor(a!) out, "
           "str path) -> ()",
)


@_conv_bn_mish_out_op.register_fake
def _(x, weight, bias, stride, residual, out, path):
    return None


# What :func:`conv_bn_mish` calls: the registered ops, or in plain eager mode the same code without the
# custom-op dispatch (see :mod:`._eager`).
register_conv_flops(torch.ops.cspmirror.conv_bn_mish, torch.ops.cspmirror.conv_bn_mish_out)

_conv = EagerOp(_conv_bn_mish_op, _conv_bn_mish_impl, _setup_context, _backward)
_conv_out = EagerOp(_conv_bn_mish_out_op, _conv_bn_mish_out_impl, mutates=(5,))
