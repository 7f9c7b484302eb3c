"""The reference backend: SPEC §1 and §3 written as plain PyTorch.

Every fast backend is tested against these functions. They assume validated arguments (the public
wrappers in :mod:`cspmirror.ops` validate) and are differentiable through ordinary autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ._eager import batched
from ._validate import split_width


def mirror_split(x: torch.Tensor, overlap: float = 0.25, axis: int = -1, mirror: bool = True) -> torch.Tensor:
    """Split ``x`` [N, C, H, W] into two overlapping parts stacked on the batch: [2N, C, H, P] (axis=-1).

    The second part is flipped along ``axis`` when ``mirror`` is set (SPEC §1.1).
    """
    y = _split_parts(x, split_width(x.shape[axis], overlap), axis, mirror)
    return y.contiguous(memory_format=memory_format_of(x))


def _split_parts(x: torch.Tensor, width: int, axis: int, mirror: bool) -> torch.Tensor:
    length = x.shape[axis]
    part1 = x.narrow(axis, 0, width)
    part2 = x.narrow(axis, length - width, width)
    if mirror:
        part2 = part2.flip(axis)
    return torch.cat([part1, part2], dim=0)


def mirror_fuse(
    parts: list[torch.Tensor],
    length: int,
    overlap: float = 0.25,
    axis: int = -1,
    mirror: bool = True,
    reduce: str = "sum",
) -> torch.Tensor:
    """Fuse parts [2N, C_i, H, P] into [N, sum(C_i), H, length] (axis=-1): channel concat, then the two
    halves of the batch put back side by side and summed where they overlap (SPEC §1.2)."""
    return _fuse_parts(parts, length, axis, mirror, reduce).contiguous(memory_format=fuse_memory_format(parts))


def _fuse_parts(parts: Sequence[torch.Tensor], length: int, axis: int, mirror: bool, reduce: str) -> torch.Tensor:
    z = torch.cat(list(parts), dim=1)
    n = z.shape[0] // 2
    width = z.shape[axis]
    z1, z2 = z[:n], z[n:]
    if mirror:
        z2 = z2.flip(axis)
    # Built out of place (slices, add, cat) rather than by adding into slices of a zero tensor: exporters
    # that do not follow writes into views (torch.onnx.export(dynamo=False), which Ultralytics' export
    # uses) would otherwise record the zeros as a constant and cut the graph off from its input.
    # The "+ 0.0" keeps the values bit for bit those of the sums into zeros (0 + z1, then + z2), which the
    # kernels reproduce: -0.0 becomes +0.0.
    start = length - width  # where part 2 begins; the overlap is [start, width)
    shared = 2 * width - length
    middle = z1.narrow(axis, start, shared) + z2.narrow(axis, 0, shared) + 0.0
    if reduce == "mean":
        middle = middle / 2
    left, right = z1.narrow(axis, 0, start) + 0.0, z2.narrow(axis, shared, width - shared) + 0.0
    return torch.cat([left, middle, right], dim=axis)


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
    """``mish(batch_norm(x)) (+ residual)`` with BatchNorm2d semantics; running stats update in place when
    training. ``momentum`` is the exponential-average factor (the module turns ``momentum=None`` into 1/n)."""
    y = F.mish(F.batch_norm(_canonical_strides(x), running_mean, running_var, weight, bias, training, momentum,
                            eps))
    if residual is not None:
        y = y + residual
    return _write(y, out)


def _canonical_strides(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or, when it is dense in its memory format but a size-1 dim has another stride than that
    format gives it (e.g. [1, 3, 2, 1] with strides (3, 1, 3, 3), from a permuted buffer), a copy with the
    format's own strides: PyTorch's CPU ``batch_norm`` backward (2.14 at least) reads such an input with the
    wrong layout and returns a wrong gradient, though its forward is right."""
    if batched(x):  # under vmap, whose batched tensors have no strides to ask (the kernel sees the whole batch)
        return x
    fmt = memory_format_of(x)
    if x.is_contiguous(memory_format=fmt) and x.stride() != _format_strides(tuple(x.shape), fmt):
        return x.clone(memory_format=fmt)
    return x


def _format_strides(shape: tuple[int, ...], fmt: torch.memory_format) -> tuple[int, ...]:
    """The strides a new [N, C, H, W] tensor of ``shape`` gets in ``fmt`` (contiguous or channels_last)."""
    n, c, h, w = shape
    if fmt == torch.channels_last:
        return (h * w * c, 1, w * c, c)
    return (c * h * w, h * w, w, 1)


def conv_bn_mish(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int = 1,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mish(conv2d(x, weight, bias, stride, padding=k//2)) (+ residual)``; BN is already folded into
    ``weight`` [C_out, C_in, k, k] and ``bias`` [C_out]."""
    y = F.mish(F.conv2d(x, weight, bias, stride=stride, padding=weight.shape[-1] // 2))
    if residual is not None:
        y = y + residual
    return _write(y, out)


# --- the fast backends' backward where it must itself be differentiable ------------------------------------

def recomputed_grads(fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor | None],
                     needs: Sequence[bool], grad: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradients of ``fn(*tensors)`` (reference ops) for the tensors whose ``needs`` flag is set, given its
    output's gradient ``grad``; None for the others.

    Called from an op's backward. When that backward is itself recorded (``create_graph=True``: a double
    backward, e.g. a gradient penalty), the gradients are recorded too, as functions of ``tensors`` (the
    op's saved inputs) and ``grad``: what a fused kernel's backward cannot give.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        inputs = [t if t is None or create_graph else t.detach().requires_grad_(need)
                  for t, need in zip(tensors, needs, strict=True)]
        wanted = [t for t, need in zip(inputs, needs, strict=True) if t is not None and need]
        y = fn(*inputs)
        found = iter(torch.autograd.grad(y, wanted, grad, create_graph=create_graph) if wanted else ())
    return [next(found) if t is not None and need else None for t, need in zip(inputs, needs, strict=True)]


def bn_mish_output(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None, eps: float,
                   training: bool) -> torch.Tensor:
    """:func:`bn_mish`'s output (no residual) as a fast backend's forward computed it: with x's batch
    statistics when ``training`` (no running-statistics update), else the running ones."""
    stats = (None, None) if training else (running_mean, running_var)
    return bn_mish(x, weight, bias, *stats, training, 0.0, eps)


def bn_mish_grads(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  running_mean: torch.Tensor | None, running_var: torch.Tensor | None, eps: float, training: bool,
                  needs: Sequence[bool]) -> list[torch.Tensor | None]:
    """:func:`recomputed_grads` of :func:`bn_mish_output` for (x, weight, bias)."""
    def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        return bn_mish_output(x, weight, bias, running_mean, running_var, eps, training)

    return recomputed_grads(forward, (x, weight, bias), needs, grad)


def conv_bn_mish_grads(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       stride: int, needs: Sequence[bool]) -> list[torch.Tensor | None]:
    """:func:`recomputed_grads` of :func:`conv_bn_mish` (no residual) for (x, weight, bias)."""
    return recomputed_grads(lambda x, w, b: conv_bn_mish(x, w, b, stride), (x, weight, bias), needs, grad)


# --- the fast backends' mirror backward on batched gradients --------------------------------------------------
# vmap over a backward (torch.autograd.grad(is_grads_batched=True), jacobian(vectorize=True), torch.func.vmap)
# hands it batched gradients, which the kernels cannot read and the fast ops' list arguments cannot be looped
# over: the adjoints below, in ops that vmap batches, give the kernels' values bit for bit (pure data movement;
# in whatever layout those ops give: vmap cannot query a memory format).

def split_adjoint(grads: Sequence[torch.Tensor], length: int, axis: int, mirror: bool,
                  reduce: str) -> torch.Tensor:
    """The gradient of a split's input (of length ``length`` along ``axis``) from its output's gradient, in
    channel slices ``grads``: their :func:`mirror_fuse` ("mean": the adjoint of a split whose overlap is
    halved, that of the "mean" fuse)."""
    return _fuse_parts(grads, length, axis, mirror, reduce)


def fuse_adjoint(grad: torch.Tensor, channels: Sequence[int], width: int, axis: int, mirror: bool,
                 reduce: str) -> list[torch.Tensor]:
    """The gradients of a fuse's parts (``channels`` channels each, ``width`` wide along ``axis``) from its
    output's gradient: the split of each channel slice, the overlap halved for "mean"."""
    if reduce == "mean":  # the overlap columns [L - P, P) halved
        start, shared = grad.shape[axis] - width, 2 * width - grad.shape[axis]
        grad = torch.cat([grad.narrow(axis, 0, start), grad.narrow(axis, start, shared) * 0.5,
                          grad.narrow(axis, width, start)], dim=axis)
    return list(_split_parts(grad, width, axis, mirror).split(list(channels), dim=1))


def _write(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return y
    out.copy_(y)
    return out


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is stored that way (and is not trivially both), else contiguous. Contiguous for a
    tensor batched by vmap, which cannot be asked its format (nor does the format of a vmapped result show)."""
    if batched(x):
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def strided_like_channels_last(t: torch.Tensor) -> bool:
    """Whether ATen lays out an output computed from ``t`` (4-D) as channels_last: ``t``'s strides are ordered like
    channels_last, as for a channel slice of a channels_last buffer, which is not itself channels_last
    (:func:`memory_format_of`). ATen's test (``Tensor.suggest_memory_format()``, c10's
    ``is_channels_last_strides_2d``) written out, as the extension's C++ operators ask it: older torch's Python copy
    (``torch._prims_common``) answers otherwise for some size-1 dims, and the fake implementations must give the
    operators' strides."""
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0):  # C, W, H, N: each stride at least the extent of those before it
        if sizes[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]):
            return False
        least = strides[d] * sizes[d]
    return True


def conv_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """``conv_bn_mish``'s output format, ATen's convolution rule (what :func:`conv_bn_mish` returns): channels_last
    when ``x`` or ``weight`` is strided like it (:func:`strided_like_channels_last`), else contiguous. On CUDA only
    cuDNN runs channels_last, and never float64: contiguous there in float64 or with cuDNN disabled."""
    if x.device.type == "cuda" and (x.dtype == torch.float64 or not torch.backends.cudnn.enabled):
        return torch.contiguous_format
    if strided_like_channels_last(x) or strided_like_channels_last(weight):
        return torch.channels_last
    return torch.contiguous_format


def bn_memory_format(x: torch.Tensor) -> torch.memory_format:
    """``bn_mish``'s output format (what :func:`bn_mish` returns): ``x``'s own (:func:`memory_format_of`) when
    ``x`` is dense, else channels_last when ``x`` is strided like it (a channel slice of a channels_last buffer:
    ATen's batch_norm rule), else contiguous."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return memory_format_of(x)
    return torch.channels_last if strided_like_channels_last(x) else torch.contiguous_format


def grad_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The format the fast backends give the gradient of a mirror op's input ``t``: ``t``'s layout as
    :func:`bn_memory_format` reads it (its own when dense, channels_last for a channel slice of a channels_last
    buffer), what ``AccumulateGrad`` gives a leaf's ``.grad`` and the layer before expects. Not the reference's:
    its gradients are whatever ATen's slice and cat backward make (contiguous, a fuse's parts channel slices of
    one NCHW buffer), which a channels_last model would convert back at the next layer."""
    return torch.contiguous_format if batched(t) else bn_memory_format(t)


def fuse_memory_format(parts: Sequence[torch.Tensor]) -> torch.memory_format:
    """``mirror_fuse``'s output format: channels_last when any part is stored that way. (In a channels_last
    model the first part is a channel slice of a channels_last tensor, not channels_last itself: its format alone
    would turn every fused stage output to NCHW, for the next convolution to convert back.)"""
    if any(memory_format_of(p) == torch.channels_last for p in parts):
        return torch.channels_last
    return torch.contiguous_format
