"""The C++/CUDA extension backend: the ``torch.ops.cspmirror_ext`` operators behind the reference's signatures.

Loading happens on first use, never at import and never from :func:`status`:

1. the prebuilt module ``cspmirror._C``, built by ``CSPMIRROR_BUILD_EXT=1 pip install --no-build-isolation -e .``;
2. otherwise a just-in-time build of ``csrc/`` with :func:`torch.utils.cpp_extension.load`: the CPU sources
   always, ``csrc/cuda_kernels.cu`` too when CUDA is available, nvcc is found and ``CSPMIRROR_BUILD_CUDA`` is
   not ``0``. The build is cached under ``$TORCH_EXTENSIONS_DIR/cspmirror`` (default ``~/.cache/cspmirror``),
   one folder per torch / Python version and device set; ``CSPMIRROR_VERBOSE_BUILD=1`` shows the compiler.

The operators (schemas in ``csrc/cspmirror_ops.cpp``) are functional. This module registers their fake
implementations (for ``torch.compile``) and autograd formulas; in plain eager mode the same formulas run through
the eager fast path of :mod:`._eager` instead, with the kernels called below the autograd key. The formulas
call the backward operators:
``mirror_split`` and ``mirror_fuse`` are each other's adjoint (``mirror_fuse_backward`` is the split of each
channel slice); ``bn_mish_backward`` recomputes normalize + Mish from the saved input and batch statistics.
``conv_bn_mish`` (inference) runs ATen's convolution with an in-place Mish (+ residual) epilogue.

Batch statistics are returned as fp64 mean and biased variance (saved for the backward); the running statistics
are then updated by ``bn_update_running_stats`` exactly as ``nn.BatchNorm2d`` does (momentum, unbiased
variance). ``out=`` is written directly by the kernels when no gradient is needed, else through ``copy_``
(as the reference does) so that autograd sees the write.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import shutil
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from ..backends import BackendStatus, BackendUnavailableError
from . import reference
from ._eager import EagerOp, batched, bump_versions, plain_eager
from ._flop_counts import register_conv_flops
from ._validate import conv_output_shape, split_width

_NAMESPACE = "cspmirror_ext"
_lock = threading.Lock()
_loaded: dict[str, Any] = {"lib": None, "origin": "", "info": "", "error": None, "cuda_error": None}


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------


def csrc_dir() -> Path | None:
    """The folder holding the C++/CUDA sources: package data of an installed wheel, or the repository's."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "csrc", here.parents[2] / "csrc"):
        if (candidate / "cpu_kernels.cpp").is_file():
            return candidate
    return None


def _build_config(csrc: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("cspmirror_build_config", csrc / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prebuilt_present() -> bool:
    try:
        return importlib.util.find_spec("cspmirror._C") is not None
    except (ImportError, ValueError):
        return False


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate is not None and candidate.is_file() else shutil.which("nvcc")


@functools.cache
def _jit_problem() -> str | None:
    """Why a just-in-time build cannot run here, or None."""
    if csrc_dir() is None:
        return "the csrc/ sources are not part of this install, and cspmirror._C is not built"
    if _compiler() is None:
        return ("no C++ compiler found (looked for $CXX, c++, g++, clang++); install one, or build cspmirror._C "
                "ahead of time with CSPMIRROR_BUILD_EXT=1")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "the just-in-time build needs ninja (pip install ninja)"
    return None


def _with_cuda() -> bool:
    return (torch.cuda.is_available() and os.environ.get("CSPMIRROR_BUILD_CUDA", "1") != "0"
            and _nvcc() is not None)


def build_directory(with_cuda: bool) -> Path:
    """Where the just-in-time build lives: one folder per torch version, Python version and device set (for
    CUDA, the GPU architectures it targets: cpp_extension leaves them out of its own build hash, so a cache
    shared between machines would otherwise hand an sm_90 build to an sm_80 GPU)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) / "cspmirror" if root else Path.home() / ".cache" / "cspmirror"
    device = f"cuda-{_cuda_archs()}" if with_cuda else "cpu"
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{device}"
    path = base / "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in tag)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cuda_archs() -> str:
    """The architectures a CUDA build targets: ``TORCH_CUDA_ARCH_LIST`` when set, else the visible GPUs'
    (what cpp_extension compiles for), e.g. ``sm90`` or ``sm80-sm90``."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs:
        return "arch-" + archs
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return "-".join(f"sm{major}{minor}" for major, minor in sorted(capabilities))


def _jit_build() -> str:
    """Build and load the library; if the CUDA build fails, fall back to the CPU kernels alone (CUDA tensors
    then raise with the compiler's message)."""
    if _with_cuda():
        try:
            return _jit_build_for(with_cuda=True)
        except Exception as exc:  # nvcc or toolkit trouble: keep the CPU backend usable
            _loaded["cuda_error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    return _jit_build_for(with_cuda=False)


def _jit_build_for(with_cuda: bool) -> str:
    from torch.utils import cpp_extension

    config = _build_config(csrc_dir())
    directory = build_directory(with_cuda)
    cpp_extension.load(
        name="cspmirror_ext_cuda" if with_cuda else "cspmirror_ext_cpu",
        sources=config.sources(with_cuda),
        extra_cflags=config.cxx_flags(with_cuda),
        extra_cuda_cflags=config.nvcc_flags(),
        extra_ldflags=config.ld_flags(),
        build_directory=str(directory),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("CSPMIRROR_VERBOSE_BUILD", "0") not in ("", "0"),
    )
    return f"built just in time in {directory}"


def _registered() -> bool:
    try:
        getattr(torch.ops, _NAMESPACE).mirror_split  # noqa: B018 - raises when the library is not loaded
    except (AttributeError, RuntimeError):
        return False
    return True


def load() -> Any:
    """``torch.ops.cspmirror_ext``, loading the prebuilt module or building just in time on the first call.

    Raises:
        BackendUnavailableError: nothing could be loaded or built; the message says why.
    """
    lib = _loaded["lib"]
    if lib is not None:
        return lib
    with _lock:
        if _loaded["lib"] is None:
            if _loaded["error"] is not None:
                raise BackendUnavailableError(_loaded["error"])
            try:
                origin = _load_library()
            except Exception as exc:  # a failed build or import: keep the reason for status()
                _loaded["error"] = f"the extension could not be loaded: {exc}"
                raise BackendUnavailableError(_loaded["error"]) from exc
            lib = getattr(torch.ops, _NAMESPACE)
            _register_python_side()
            _loaded.update(origin=origin, info=lib.build_info(), lib=lib)
    return _loaded["lib"]


def _load_library() -> str:
    if _registered():
        return "already loaded"
    prebuilt_error = None
    if _prebuilt_present():
        try:
            importlib.import_module("cspmirror._C")
            return "prebuilt cspmirror._C"
        except ImportError as exc:  # e.g. built against another torch: fall back to a fresh build
            prebuilt_error = exc
    problem = _jit_problem()
    if problem is not None:
        raise RuntimeError(problem if prebuilt_error is None else f"{problem}; cspmirror._C: {prebuilt_error}")
    return _jit_build()


def status() -> BackendStatus:
    """Whether the extension runs here; never builds (a build happens on the first op call)."""
    if _loaded["lib"] is not None:
        note = f"; the CUDA build failed: {_loaded['cuda_error']}" if _loaded["cuda_error"] else ""
        return BackendStatus("extension", True, f"{_loaded['info']}, {_loaded['origin']}{note}")
    if _loaded["error"] is not None:
        return BackendStatus("extension", False, _loaded["error"])
    if _prebuilt_present():
        return BackendStatus("extension", True, "prebuilt cspmirror._C, loads on first use")
    problem = _jit_problem()
    if problem is not None:
        return BackendStatus("extension", False, problem)
    return BackendStatus("extension", True,
                         "not loaded yet: on first use, built just in time, or taken from the build cache when "
                         "its sources are unchanged (needs a C++ compiler)")


def _lib_for(t: torch.Tensor) -> Any:
    lib = load()
    kind = t.device.type
    if kind == "cuda" and "cuda" not in _loaded["info"]:
        why = _loaded["cuda_error"] or "no CUDA or nvcc at build time, or CSPMIRROR_BUILD_CUDA=0"
        raise BackendUnavailableError(f"backend='extension' was built without CUDA kernels ({why})")
    if kind not in ("cpu", "cuda", "meta"):
        raise BackendUnavailableError(f"backend='extension' has no kernels for {kind} tensors")
    return lib


# ------------------------------------------------------------------------------------------------------------
# The reference's signatures
# ------------------------------------------------------------------------------------------------------------


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def mirror_split(x: torch.Tensor, overlap: float = 0.25, axis: int = -1, mirror: bool = True) -> torch.Tensor:
    """[N, C, H, W] -> [2N, C, H, P] for axis=-1 ([2N, C, P, W] for axis=-2), in ``x``'s memory format."""
    _lib_for(x)
    return _EAGER["mirror_split"](x, split_width(x.shape[axis], overlap), axis, mirror)


def mirror_fuse(parts: Sequence[torch.Tensor], length: int, overlap: float = 0.25, axis: int = -1,
                mirror: bool = True, reduce: str = "sum") -> torch.Tensor:
    """Parts [2N, C_i, H, P] -> [N, sum(C_i), H, length] (axis=-1), channels_last when a part is."""
    _lib_for(parts[0])
    return _EAGER["mirror_fuse"](list(parts), length, axis, mirror, reduce == "mean")


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
    """``mish(batch_norm(x)) (+ residual)`` on x [N, C, H, W]; running stats [C] update in place when training."""
    lib = _lib_for(x)
    direct = out is not None and not _needs_grad(x, weight, bias, residual, out)
    if training:
        if direct:
            mean, var = lib.bn_mish_train_out(x, weight, bias, eps, residual, out)
            bump_versions([out])
            y = out
        else:
            y, mean, var = _EAGER["bn_mish_train"](x, weight, bias, eps, residual)
        if running_mean is not None:
            _update_running_stats(lib, running_mean, running_var, mean.detach(), var.detach(), momentum,
                                  x.numel() // x.shape[1])
            bump_versions([running_mean, running_var])
    elif direct:
        lib.bn_mish_eval_out(x, weight, bias, running_mean, running_var, eps, residual, out)
        bump_versions([out])
        y = out
    else:
        y = _EAGER["bn_mish_eval"](x, weight, bias, running_mean, running_var, eps, residual)
    if out is None or direct:
        return y
    return out.copy_(y)


def _update_running_stats(lib: Any, *args: Any) -> None:
    """``bn_update_running_stats``; in plain eager mode below the ADInplaceOrView key, as ATen's batch_norm updates
    them: running statistics made under torch.inference_mode (no version counter) are then updated outside it
    too, as on the reference and Triton (that key refused them, after the kernel had written them). The caller
    bumps the version counters."""
    if plain_eager(list(args[:2])):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            lib.bn_update_running_stats(*args)
    else:
        lib.bn_update_running_stats(*args)


def conv_bn_mish(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int = 1,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mish(conv2d(x, weight, bias, stride, padding=k//2)) (+ residual)``: [N, C_out, H_out, W_out], channels_last
    when ``x`` or ``weight`` is (:func:`~cspmirror.ops.reference.conv_memory_format`, ATen's rule)."""
    lib = _lib_for(x)
    if out is not None and not _needs_grad(x, weight, bias, residual, out):
        lib.conv_bn_mish_out(x, weight, bias, stride, residual, out)
        bump_versions([out])
        return out
    y = _EAGER["conv_bn_mish"](x, weight, bias, stride, residual)
    return y if out is None else out.copy_(y)


def build_info() -> str:
    """What the loaded library was built with, e.g. ``"cpu (avx2) + cuda"`` (loads it)."""
    load()
    return _loaded["info"]


# ------------------------------------------------------------------------------------------------------------
# Fake implementations and autograd formulas
# ------------------------------------------------------------------------------------------------------------


def _format_of(t: torch.Tensor) -> torch.memory_format:
    """The mirror kernels' output format rule (the reference's): channels_last only when not also contiguous."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _empty(shape: Sequence[int], like: torch.Tensor, fmt: torch.memory_format,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(list(shape), dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _stats_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty([x.shape[1]], dtype=torch.float64)


def _param_grad_like(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    return x.new_empty([x.shape[1] if wanted else 0], dtype=_acc_dtype(x))


def _fake_split(x, width, axis, mirror):
    shape = list(x.shape)
    shape[0] *= 2
    shape[axis] = width
    return _empty(shape, x, _format_of(x))


def _fake_fuse(parts, length, axis, mirror, mean):
    shape = list(parts[0].shape)
    shape[0] //= 2
    shape[1] = sum(p.shape[1] for p in parts)
    shape[axis] = length
    return _empty(shape, parts[0], reference.fuse_memory_format(parts))


def _fake_fuse_backward(grad, channels, width, axis, mirror, mean):
    outs = []
    for c in channels:
        shape = list(grad.shape)
        shape[0] *= 2
        shape[1] = c
        shape[axis] = width
        outs.append(_empty(shape, grad, _format_of(grad)))
    return outs


def _fake_like_x(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x.contiguous(memory_format=reference.bn_memory_format(x)))


def _fake_bn_train(x, weight, bias, eps, residual):
    return _fake_like_x(x), _stats_like(x), _stats_like(x)


def _fake_bn_train_out(x, weight, bias, eps, residual, out):
    return _stats_like(x), _stats_like(x)


def _fake_bn_eval(x, weight, bias, running_mean, running_var, eps, residual):
    return _fake_like_x(x)


def _fake_none(*args):
    return None


def _fake_bn_backward(grad_y, x, weight, bias, mean, var, eps, training, param_grads):
    return _fake_like_x(x), _param_grad_like(x, param_grads), _param_grad_like(x, param_grads)


def _fake_conv(x, weight, bias, stride, residual):
    return _empty(conv_output_shape(x.shape, weight.shape, stride), x, reference.conv_memory_format(x, weight))


def _lib() -> Any:
    return getattr(torch.ops, _NAMESPACE)


# The mirror ops' input gradients take reference.grad_memory_format (the C++ operators lay them out like the
# gradient they read: a copy only where the gradient and the input disagree).

def _setup_split(ctx, inputs, output):
    x, _, axis, mirror = inputs
    ctx.length, ctx.axis, ctx.mirror, ctx.format = x.shape[axis], axis, mirror, reference.grad_memory_format(x)


def _backward_split(ctx, grad):
    if batched(grad):  # vmap over the backward (see reference.split_adjoint)
        return reference.split_adjoint([grad], ctx.length, ctx.axis, ctx.mirror, "sum"), None, None, None
    grad_x = _lib().mirror_fuse([grad], ctx.length, ctx.axis, ctx.mirror, False)
    return grad_x.contiguous(memory_format=ctx.format), None, None, None


def _setup_fuse(ctx, inputs, output):
    parts, _, axis, mirror, mean = inputs
    ctx.channels = [p.shape[1] for p in parts]
    ctx.formats = [reference.grad_memory_format(p) for p in parts]
    ctx.width, ctx.axis, ctx.mirror, ctx.mean = parts[0].shape[axis], axis, mirror, mean


def _backward_fuse(ctx, grad):
    if batched(grad):
        grads = reference.fuse_adjoint(grad, ctx.channels, ctx.width, ctx.axis, ctx.mirror, _reduce(ctx.mean))
    else:
        grads = _lib().mirror_fuse_backward(grad, ctx.channels, ctx.width, ctx.axis, ctx.mirror, ctx.mean)
        grads = [g.contiguous(memory_format=fmt) for g, fmt in zip(grads, ctx.formats, strict=True)]
    return list(grads), None, None, None, None


def _setup_fuse_backward(ctx, inputs, output):
    grad, _, _, axis, mirror, mean = inputs
    ctx.length, ctx.axis, ctx.mirror, ctx.mean = grad.shape[axis], axis, mirror, mean
    ctx.format = reference.grad_memory_format(grad)


def _backward_fuse_backward(ctx, grads):
    # The adjoint of "split, overlap scaled by 1/2" is "fuse, then halve the overlap": mirror_fuse(mean).
    if any(batched(g) for g in grads):
        grad = reference.split_adjoint(grads, ctx.length, ctx.axis, ctx.mirror, _reduce(ctx.mean))
    else:
        grad = _lib().mirror_fuse(list(grads), ctx.length, ctx.axis, ctx.mirror, ctx.mean)
        grad = grad.contiguous(memory_format=ctx.format)
    return grad, None, None, None, None, None


def _reduce(mean: bool) -> str:
    return "mean" if mean else "sum"


def _setup_bn_train(ctx, inputs, output):
    x, weight, bias, eps, residual = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, var)


def _setup_bn_eval(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, eps, residual = inputs
    ctx.save_for_backward(x, weight, bias, running_mean, running_var)
    ctx.eps = eps


def _bn_grads(ctx, grad, training: bool, weight_index: int = 1, bias_index: int = 2):
    x, weight, bias, mean, var = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not (need[0] or need[weight_index] or need[bias_index]):  # only the residual's: the gradient itself
        return None, None, None
    if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiated in turn
        return tuple(reference.bn_mish_grads(grad, x, weight, bias, mean, var, ctx.eps, training,
                                             (need[0], need[weight_index], need[bias_index])))
    gx, gw, gb = _lib().bn_mish_backward(grad, x, weight, bias, mean, var, ctx.eps, training,
                                         need[weight_index] or need[bias_index])
    return (gx if need[0] else None,
            gw.to(weight.dtype) if need[weight_index] else None,
            gb.to(bias.dtype) if need[bias_index] else None)


def _backward_bn_train(ctx, grad, _grad_mean, _grad_var):
    gx, gw, gb = _bn_grads(ctx, grad, True)
    return gx, gw, gb, None, grad if ctx.needs_input_grad[4] else None


def _backward_bn_eval(ctx, grad):
    gx, gw, gb = _bn_grads(ctx, grad, False)
    return gx, gw, gb, None, None, None, grad if ctx.needs_input_grad[6] else None


def _setup_conv(ctx, inputs, output):
    x, weight, bias, stride, residual = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.stride = stride


def _backward_conv(ctx, grad):
    # Training through the inference op is rare: recompute the pre-activation and use ATen's backward ops.
    x, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiated in turn
        gx, gw, gb = reference.conv_bn_mish_grads(grad, x, weight, bias, ctx.stride, need[:3])
        return gx, gw, gb, None, grad if need[4] else None
    pad = weight.shape[-1] // 2
    pre = F.conv2d(x, weight, bias, ctx.stride, pad)
    grad_pre = torch.ops.aten.mish_backward(grad, pre)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad_pre, x, weight, None if bias is None else [weight.shape[0]], [ctx.stride] * 2, [pad] * 2, [1, 1],
        False, [0, 0], 1, [need[0], need[1], bias is not None and need[2]],
    )
    return gx, gw, gb, None, grad if need[4] else None


_FAKES = {
    "mirror_split": _fake_split,
    "mirror_fuse": _fake_fuse,
    "mirror_fuse_backward": _fake_fuse_backward,
    "bn_mish_train": _fake_bn_train,
    "bn_mish_train_out": _fake_bn_train_out,
    "bn_mish_eval": _fake_bn_eval,
    "bn_mish_eval_out": _fake_none,
    "bn_mish_backward": _fake_bn_backward,
    "bn_update_running_stats": _fake_none,
    "conv_bn_mish": _fake_conv,
    "conv_bn_mish_out": _fake_none,
}

_AUTOGRAD = {
    "mirror_split": (_backward_split, _setup_split),
    "mirror_fuse": (_backward_fuse, _setup_fuse),
    "mirror_fuse_backward": (_backward_fuse_backward, _setup_fuse_backward),
    "bn_mish_train": (_backward_bn_train, _setup_bn_train),
    "bn_mish_eval": (_backward_bn_eval, _setup_bn_eval),
    "conv_bn_mish": (_backward_conv, _setup_conv),
}


_EAGER: dict[str, EagerOp] = {}  # operator name -> the operator with an eager fast path (filled by load())


def _eager_op(name: str, backward: Any, setup: Any) -> EagerOp:
    """In plain eager mode: the kernel called below the autograd key, and the autograd formula in a plain
    ``autograd.Function`` (no Python dispatch of the registered formula, no zero-filled gradients for the batch
    statistics). The registered operator everywhere else."""
    op = getattr(_lib(), name)

    def below_autograd(*args: Any) -> Any:
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    below_autograd.__name__ = name
    return EagerOp(op, below_autograd, setup, backward)


def _register_python_side() -> None:
    """Fake implementations and autograd formulas, and the eager ops (built here, not on first use: Dynamo
    cannot trace the class that an :class:`EagerOp` defines)."""
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{_NAMESPACE}::{name}", fake)
    for name, (backward, setup) in _AUTOGRAD.items():
        torch.library.register_autograd(f"{_NAMESPACE}::{name}", backward, setup_context=setup)
        _EAGER[name] = _eager_op(name, backward, setup)
    namespace = getattr(torch.ops, _NAMESPACE)
    register_conv_flops(namespace.conv_bn_mish, namespace.conv_bn_mish_out)


__all__ = ["status", "load", "build_info", "build_directory", "csrc_dir", "mirror_split", "mirror_fuse",
           "bn_mish", "conv_bn_mish"]
