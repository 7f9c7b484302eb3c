"""The public fused ops (SPEC §3), one signature on every backend.

Each op validates its arguments here (so every backend raises the same errors), resolves ``backend``
("auto" | "triton" | "extension" | "reference") for the input's device, and calls that backend's
implementation. The fast backends' modules are imported lazily, on first use (the reference, plain PyTorch,
always is: it is what "auto" runs off CUDA). Under a ``torch.func`` transform (``grad``, ``vmap``, ...)
every backend runs the reference: the fast ops' autograd formulas have no functorch rules. So it does inside
``torch.autograd.forward_ad.dual_level()`` (forward-mode AD: the fast ops have no ``jvp``, and would return
their output without a tangent), and while ``torch.onnx.export`` traces the model (either exporter): ONNX has no
lowering for the fast ops, and the reference computes the same function in standard ops. A fast op's backward
run under vmap (``torch.autograd.grad(..., is_grads_batched=True)``, ``torch.autograd.functional.jacobian(...,
vectorize=True)``) takes the mirror ops' gradients from the reference's adjoints (the same values: pure data
movement, in ops that vmap batches); the other ops' backwards call registered ops, which vmap runs one sample
at a time, or PyTorch's.

=============  ==========================================
backend        module
=============  ==========================================
reference      :mod:`cspmirror.ops.reference`
triton         :mod:`cspmirror.ops.triton_mirror`, :mod:`cspmirror.ops.triton_bn_mish`,
               :mod:`cspmirror.ops.triton_conv`
extension      :mod:`cspmirror.ops.extension`
=============  ==========================================
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as forward_ad

from .. import backends
from . import _validate, reference  # noqa: F401  (loaded: see _load_implementation)
from ._eager import functorch_active

# (op, backend) -> module holding a function named after the op.
_IMPLEMENTATIONS: dict[tuple[str, str], str] = {
    ("mirror_split", "reference"): "cspmirror.ops.reference",
    ("mirror_fuse", "reference"): "cspmirror.ops.reference",
    ("bn_mish", "reference"): "cspmirror.ops.reference",
    ("conv_bn_mish", "reference"): "cspmirror.ops.reference",
    ("mirror_split", "triton"): "cspmirror.ops.triton_mirror",
    ("mirror_fuse", "triton"): "cspmirror.ops.triton_mirror",
    ("bn_mish", "triton"): "cspmirror.ops.triton_bn_mish",
    ("conv_bn_mish", "triton"): "cspmirror.ops.triton_conv",
    ("mirror_split", "extension"): "cspmirror.ops.extension",
    ("mirror_fuse", "extension"): "cspmirror.ops.extension",
    ("bn_mish", "extension"): "cspmirror.ops.extension",
    ("conv_bn_mish", "extension"): "cspmirror.ops.extension",
}


_RESOLVED: dict[tuple[str, str, str, int | None], Callable] = {}  # (op, backend, device type, device index)


def implementation(op: str, backend: str, device: torch.device) -> Callable:
    """The function that runs ``op`` on ``device`` for ``backend`` (after resolving "auto").

    Successful look-ups are cached: a warm call is a dict look-up that ``torch.compile(fullgraph=True)``
    traces without a graph break (the first, cold look-up imports modules, which breaks the graph:
    :func:`cspmirror.accelerate` warms the cache for a model's ops and device).
    """
    if backend != "reference" and (_functorch_transform() or _forward_ad() or _onnx_export()):
        backend = "reference"  # (see the module docstring)
    key = (op, backend, device.type, device.index)  # plain constants, which every Dynamo version hashes
    fn = _RESOLVED.get(key)
    if fn is None:
        fn = _RESOLVED[key] = _load_implementation(op, backend, device)
    return fn


def _functorch_transform() -> bool:
    return not torch.compiler.is_compiling() and functorch_active()


def _forward_ad() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level()`` is open (dual tensors may reach the op)."""
    return forward_ad._current_level >= 0


def _onnx_export() -> bool:
    """Whether ``torch.onnx.export`` is tracing this call: its TorchScript exporter traces with ``torch.jit``, its
    dynamo exporter through ``torch.export``; asked only then (the question itself costs a microsecond)."""
    return (torch.jit.is_tracing() or torch.compiler.is_exporting()) and torch.onnx.is_in_onnx_export()


def _load_implementation(op: str, backend: str, device: torch.device) -> Callable:
    concrete = backends.resolve(backend, device)
    if backend == "auto" and (op, concrete) not in _IMPLEMENTATIONS:
        concrete = "reference"
    module_name = _IMPLEMENTATIONS.get((op, concrete))
    if module_name is None:
        raise NotImplementedError(f"backend={concrete!r} does not implement {op}")
    # A loaded module is a dict look-up, which torch.compile traces; it cannot trace an import (a graph break,
    # an error with fullgraph=True): a first call inside torch.compile finds the reference loaded, and
    # cspmirror.accelerate, building a CSPMirrorNet and moving any cspmirror layer (.to()) load them beforehand.
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise backends.BackendUnavailableError(
                f"backend={concrete!r} for {op} could not be loaded: {exc}"
            ) from exc
    if concrete == "extension":
        # Load (or build) the library now: its first load takes a lock, which torch.compile cannot trace.
        module.load()
    return getattr(module, op)


def mirror_split(
    x: torch.Tensor, overlap: float = 0.25, axis: int = -1, mirror: bool = True, *, backend: str = "auto"
) -> torch.Tensor:
    """Overlapping mirrored split (SPEC §1.1).

    Args:
        x: [N, C, H, W].
        overlap: in [0, 1]; each part reaches ``floor(overlap * ceil(L / 2))`` past the middle.
        axis: -1 splits W, -2 splits H.
        mirror: flip the second part along ``axis``.

    Returns:
        [2N, C, H, P] for ``axis=-1`` (``[2N, C, P, W]`` for ``axis=-2``), part 1 then part 2 on the batch,
        in ``x``'s memory format.
    """
    x, overlap, axis = _validate.check_split_args(x, overlap, axis)
    return implementation("mirror_split", backend, x.device)(x, overlap, axis, bool(mirror))


def mirror_fuse(
    parts: Sequence[torch.Tensor],
    length: int,
    overlap: float = 0.25,
    axis: int = -1,
    mirror: bool = True,
    reduce: str = "sum",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Sum + concat fusion (SPEC §1.2), the adjoint of :func:`mirror_split`.

    Args:
        parts: tensors [2N, C_i, H, P] (axis=-1), concatenated along channels.
        length: the fused length L of ``axis``; P must equal the split width of L.
        reduce: "sum" or "mean" ("mean" halves the overlap columns).

    Returns:
        [N, sum(C_i), H, L], channels_last when a part is (else contiguous).
    """
    parts, length, overlap, axis, reduce = _validate.check_fuse_args(parts, length, overlap, axis, reduce)
    fn = implementation("mirror_fuse", backend, parts[0].device)
    return fn(parts, length, overlap, axis, bool(mirror), reduce)


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
    backend: str = "auto",
) -> torch.Tensor:
    """``mish(batch_norm(x)) (+ residual)`` (SPEC §1.3, §3).

    Args:
        x: [N, C, H, W]. weight, bias, running_mean, running_var: [C], in x's dtype (or all fp32 for half
            inputs, as BatchNorm2d).
        training: batch statistics (and running-stat update in place) when True, running stats when False.
        momentum: exponential-average factor for the running stats (``nn.BatchNorm2d`` semantics).
        residual: [N, C, H, W], added after Mish.
        out: optional [N, C, H, W] destination, e.g. a channel slice of a larger buffer.

    Returns:
        [N, C, H, W] (``out`` when given).
    """
    x = _validate.check_bn_args(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                residual, out)
    fn = implementation("bn_mish", backend, x.device)
    return fn(x, weight, bias, running_mean, running_var, bool(training), float(momentum), float(eps),
              residual, out=out)


def conv_bn_mish(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int = 1,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Inference conv with BN folded in: ``mish(conv2d(x, weight, bias, stride, padding=k//2)) (+ residual)``.

    Args:
        x: [N, C_in, H, W]. weight: [C_out, C_in, k, k] with k in (1, 3). bias: [C_out].
        stride: 1 or 2. residual / out: [N, C_out, H_out, W_out].
    """
    dtype = autocast_dtype(x)
    if dtype is not None:
        # Under torch.autocast this op behaves like conv2d: its inputs run in the autocast dtype.
        x, weight, bias, residual = _autocast_cast(dtype, x, weight, bias, residual)
    x = _validate.check_conv_args(x, weight, bias, stride, residual, out)
    fn = implementation("conv_bn_mish", backend, x.device)
    return fn(x, weight, bias, int(stride), residual, out=out)


def autocast_dtype(x: object) -> torch.dtype | None:
    """The dtype a convolution of ``x`` runs in under an enabled ``torch.autocast`` of its device (None: no
    autocast there, or ``x`` is float64 or not a tensor, which autocast leaves as they are)."""
    if (isinstance(x, torch.Tensor) and x.device.type in ("cuda", "cpu") and x.dtype != torch.float64
            and torch.is_autocast_enabled(x.device.type)):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _autocast_cast(dtype: torch.dtype, *tensors: object) -> tuple:
    """Cast the floating-point tensors among ``tensors`` to ``dtype`` (float64 and non-tensors stay), as
    autocast casts the inputs of a lower-precision op such as conv2d."""
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


__all__ = ["mirror_split", "mirror_fuse", "bn_mish", "conv_bn_mish", "implementation"]
