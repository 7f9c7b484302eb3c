"""Argument checks shared by every backend.

The public ops in :mod:`cspmirror.ops` call these before dispatching, so a bad argument raises the same
``ValueError`` / ``TypeError`` (naming the argument) whichever backend would have run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
REDUCES = ("sum", "mean")


def check_tensor(t: object, name: str, ndim: int | None = 4) -> torch.Tensor:
    """Check that ``t`` is a floating-point tensor of rank ``ndim``."""
    if not isinstance(t, torch.Tensor):
        hint = ""
        if type(t).__name__ == "Proxy":  # symbolic tracing of a model without the ops marked as leaves
            hint = ("; to trace a model with torch.fx, use cspmirror.integrations.fx.create_feature_extractor, "
                    "or pass tracer_kwargs=cspmirror.integrations.fx.tracer_kwargs(), which keep the fused ops "
                    "as leaves")
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}{hint}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor [N, C, H, W], got shape {tuple(t.shape)}")
    if ndim == 4 and t.numel() == 0:
        raise ValueError(f"{name} must have every dimension >= 1, got shape {tuple(t.shape)}")
    return t


def check_like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    """Check that ``t`` lives on the same device and has the same dtype as ``ref``."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def check_overlap(overlap: float) -> float:
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)):
        raise TypeError(f"overlap must be a number in [0, 1], got {type(overlap).__name__}")
    if not 0.0 <= float(overlap) <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    return float(overlap)


def check_axis(axis: int) -> int:
    """Return the split axis as -1 (W) or -2 (H); 3 and 2 are accepted as their positive spellings."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int (-1 for W or -2 for H), got {type(axis).__name__}")
    if axis not in (-1, -2, 2, 3):
        raise ValueError(f"axis must be -1 (W) or -2 (H), got {axis}")
    return axis - 4 if axis > 0 else axis


def check_reduce(reduce: str) -> str:
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    return reduce


def split_width(length: int, overlap: float) -> int:
    """Width ``P`` of each part when a length-``length`` axis is split with ``overlap`` (SPEC §1.1)."""
    half = (length + 1) // 2
    o = math.floor(overlap * half)
    return min(half + o, length)


def check_split_args(x: object, overlap: float, axis: int) -> tuple[torch.Tensor, float, int]:
    x = check_tensor(x, "x")
    return x, check_overlap(overlap), check_axis(axis)


def check_fuse_args(
    parts: object, length: int, overlap: float, axis: int, reduce: str
) -> tuple[list[torch.Tensor], int, float, int, str]:
    """Validate ``mirror_fuse`` arguments; returns them normalised (parts as a list, axis negative)."""
    if isinstance(parts, torch.Tensor):
        parts = [parts]
    if not isinstance(parts, Sequence) or len(parts) == 0:
        raise TypeError("parts must be a non-empty list of 4-D tensors [2N, C_i, H, P]")
    parts = [check_tensor(p, f"parts[{i}]") for i, p in enumerate(parts)]
    overlap, axis, reduce = check_overlap(overlap), check_axis(axis), check_reduce(reduce)
    if isinstance(length, torch.Tensor) and length.numel() == 1 and not length.is_floating_point():
        length = int(length)  # a size recorded by torch.jit.trace: the traced graph keeps that size
    if isinstance(length, bool) or not isinstance(length, (int, torch.SymInt)):  # (symbolic: torch.export)
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    first = parts[0]
    if first.shape[0] % 2:
        raise ValueError(f"parts[0] must have an even batch (2N: both halves stacked), got {first.shape[0]}")
    width = split_width(length, overlap)
    other_axis = -2 if axis == -1 else -1
    for i, p in enumerate(parts):
        check_like(p, first, f"parts[{i}]", "parts[0]")
        if p.shape[0] != first.shape[0] or p.shape[other_axis] != first.shape[other_axis]:
            raise ValueError(
                f"parts[{i}] has shape {tuple(p.shape)}, which does not match parts[0] {tuple(first.shape)} "
                "outside the channel and split axes"
            )
        if p.shape[axis] != width:
            raise ValueError(
                f"parts[{i}] has size {p.shape[axis]} on axis {axis}, but length={length} with "
                f"overlap={overlap} gives parts of size {width}"
            )
    return parts, length, overlap, axis, reduce


def check_bn_args(
    x: object,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    residual: torch.Tensor | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    x = check_tensor(x, "x")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        check_tensor(t, name, ndim=1)
        if t.shape[0] != channels:
            raise ValueError(f"{name} must have {channels} elements (x's channels), got {t.shape[0]}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    _check_bn_vector_dtypes(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    if torch.is_grad_enabled():
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.requires_grad:
                # (torch.nn.functional.batch_norm refuses it too; a fast backend would update it silently)
                raise ValueError(f"{name} must not require grad: the running statistics are buffers, updated in "
                                 "place when training and constants in eval, not differentiable inputs")
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:  # (NaN too)
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if training:
        per_channel = x.numel() // channels
        if per_channel <= 1:
            # Same condition and wording as torch.nn.functional.batch_norm.
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.size()}"
            )
    check_residual_out(x, residual, out)
    return x


def _check_bn_vector_dtypes(x: torch.Tensor, **vectors: torch.Tensor | None) -> None:
    """``nn.BatchNorm2d``'s rule: the [C] tensors all have x's dtype, or all float32 when x is fp16 / bf16."""
    given = [(name, t) for name, t in vectors.items() if t is not None]
    if not given:
        return
    first_name, first = given[0]
    allowed = (x.dtype, torch.float32) if x.dtype in HALF_DTYPES else (x.dtype,)
    if first.dtype not in allowed:
        raise TypeError(f"{first_name} has dtype {first.dtype} but x has dtype {x.dtype}: weight, bias, "
                        f"running_mean and running_var must have x's dtype"
                        + (" or all be float32" if x.dtype in HALF_DTYPES else ""))
    for name, t in given[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}: weight, "
                            "bias, running_mean and running_var must share one dtype")


def check_residual_out(y_like: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor | None,
                       shape: tuple[int, ...] | None = None) -> None:
    """``residual`` and ``out`` must match the op's output shape, device and dtype."""
    shape = tuple(y_like.shape) if shape is None else shape
    for name, t in (("residual", residual), ("out", out)):
        if t is None:
            continue
        check_tensor(t, name)
        check_like(t, y_like, name, "x")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if out is not None and any(size > 1 and stride == 0 for size, stride in zip(out.shape, out.stride(), strict=True)):
        # (PyTorch's own "internal overlap" test for a written-to tensor)
        raise ValueError(f"out has a dimension of stride 0 (an expanded tensor, strides {out.stride()}): "
                         "several of its elements share memory, so it cannot be written to")
    if (out is not None and not torch.compiler.is_compiling() and out.is_inference()
            and not torch.is_inference_mode_enabled()):
        # PyTorch's error for any in-place write (the reference's copy_ raises it; the fast kernels wrote silently)
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not allowed: out was made "
                           "under torch.inference_mode; make a clone to get a normal tensor before writing into it. "
                           "See https://github.com/pytorch/rfcs/pull/17 for more details.")


def conv_output_shape(x_shape: Sequence[int], weight_shape: Sequence[int], stride: int) -> tuple[int, int, int, int]:
    """[N, C_out, H_out, W_out] of ``conv2d(x, weight, stride, padding=k // 2)``."""
    n, _, h, w = x_shape
    k = weight_shape[-1]
    pad = k // 2
    return (n, weight_shape[0], (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1)


def check_conv_args(
    x: object, weight: object, bias: torch.Tensor | None, stride: int,
    residual: torch.Tensor | None, out: torch.Tensor | None,
) -> torch.Tensor:
    x = check_tensor(x, "x")
    weight = check_tensor(weight, "weight")
    check_like(weight, x, "weight", "x")
    c_out, c_in, kh, kw = weight.shape
    if c_in != x.shape[1]:
        raise ValueError(f"weight expects {c_in} input channels but x has {x.shape[1]}")
    if kh != kw or kh not in (1, 3):
        raise ValueError(f"weight must be a 1x1 or 3x3 kernel, got {kh}x{kw}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != c_out:
            raise ValueError(f"bias must have {c_out} elements, got {bias.shape[0]}")
        check_like(bias, x, "bias", "x")
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    check_residual_out(x, residual, out, shape=conv_output_shape(x.shape, weight.shape, stride))
    return x
