"""``cspmirror.accelerate``: switch a model's fused ops to another backend, in place, with the same weights.

The backend is a plain attribute of each cspmirror module (see :class:`cspmirror.layers.BackendMixin`), never a
parameter or buffer: a state dict saved under one backend loads under any other, and
:func:`cspmirror.fuse_for_inference` composes with :func:`accelerate` in either order.

Autocast (``torch.autocast``, bf16 / fp16) behaves as it does for the PyTorch ops each fused op replaces, on every
backend alike:

============== =====================================================================================
op             under autocast
============== =====================================================================================
conv_bn_mish   like ``conv2d`` (a lower-precision op): ``x``, ``weight``, ``bias`` and ``residual`` are
               cast to the autocast dtype by the public wrapper :func:`cspmirror.ops.conv_bn_mish`, so the
               kernel sees one dtype and returns the autocast dtype.
bn_mish        like ``batch_norm``: no cast. It runs in ``x``'s dtype (the autocast dtype when ``x`` comes
               from an autocast conv) with the fp32 parameters and running statistics of the module.
mirror_split,  data movement (like ``narrow`` / ``flip`` / ``cat``): no cast; the output has the input's
mirror_fuse    dtype, and ``mirror_fuse``'s parts must share one dtype.
============== =====================================================================================

The casts live in the public wrappers of :mod:`cspmirror.ops` (one place for every backend, traced by
``torch.compile``); the registered ``torch.ops.cspmirror.*`` custom ops have no autocast kernel, so calling
them directly under autocast runs them in their inputs' dtypes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import ops
from .backends import BACKENDS, BackendUnavailableError
from .fuse import set_backend
from .layers import BackendMixin, BatchNormMish2d, ConvBNMish, MirrorFuse, MirrorSplit

OPS = ("mirror_split", "mirror_fuse", "bn_mish", "conv_bn_mish")


def ops_used(model: nn.Module) -> tuple[str, ...]:
    """The fused ops that ``model``'s cspmirror modules call now (a fused ConvBNMish calls ``conv_bn_mish``)."""
    used = set()
    for module in model.modules():
        if isinstance(module, MirrorSplit):
            used.add("mirror_split")
        elif isinstance(module, MirrorFuse):
            used.add("mirror_fuse")
        elif isinstance(module, BatchNormMish2d):
            used.add("bn_mish")
        elif isinstance(module, ConvBNMish) and module.fused:
            used.add("conv_bn_mish")
    return tuple(op for op in OPS if op in used)


def model_devices(model: nn.Module) -> list[torch.device]:
    """The devices of ``model``'s parameters and buffers (the CPU for a model without tensors)."""
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    return sorted(devices, key=str) or [torch.device("cpu")]


def check_backend(model: nn.Module, backend: str, also: tuple[str, ...] = ()) -> None:
    """Raise :class:`BackendUnavailableError` unless ``backend`` runs every op ``model`` uses on its devices
    (and the ops in ``also``, which it is about to use).

    Resolving an op also loads its implementation and caches the look-up, so that a model compiled with
    ``torch.compile(fullgraph=True)`` afterwards meets no import (a graph break) in its ops. Ops the model does
    not use yet (``conv_bn_mish`` before :func:`cspmirror.fuse_for_inference`) are warmed when their backend
    can run them, and otherwise left to fail, with the same error, at their first call.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    needed = (*ops_used(model), *also)
    for device in model_devices(model):
        for op in OPS:
            try:
                ops.implementation(op, backend, device)
            except (BackendUnavailableError, NotImplementedError) as exc:
                if op in needed:
                    raise BackendUnavailableError(
                        f"backend={backend!r} cannot run the model: its {op} cannot run on "
                        f"{device}: {exc}"
                    ) from exc


def preload(model: nn.Module) -> None:
    """Load and cache the implementations of every fused op for the backends ``model``'s cspmirror modules
    use, on the devices its tensors are on (what :func:`check_backend` does), raising nothing: a backend that
    cannot run says so at its first call. Then ``torch.compile(model, fullgraph=True)`` meets no import, which
    it cannot trace, also inside ``torch.utils.checkpoint`` regions, where it cannot fill the look-up cache."""
    for backend in {m.backend for m in model.modules() if isinstance(m, BackendMixin)}:
        try:
            check_backend(model, backend)
        except BackendUnavailableError:
            pass


def accelerate(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Run ``model``'s fused ops on ``backend``, in place; the weights (and state-dict keys) stay as they are.

    Args:
        model: any module containing cspmirror modules (a :class:`cspmirror.CSPMirrorNet`, a timm or
            Ultralytics model built from them, a ``torch.compile`` wrapper of one).
        backend: "auto" (Triton for CUDA tensors when it can run, else the reference, decided per call),
            "triton", "extension" or "reference".

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``backend`` is not one of those names.
        BackendUnavailableError: ``backend`` cannot run an op the model uses on the device its weights are
            on (e.g. "triton" for a CPU model without ``TRITON_INTERPRET=1``); the model is left unchanged.

    Move the model to its device first: a backend is checked against the device the weights are on now.
    """
    check_backend(model, backend)
    return set_backend(model, backend)


def backend_of(model: nn.Module) -> str | None:
    """The backend of ``model``'s cspmirror modules: None when it has none, "mixed" when they disagree."""
    found = {m.backend for m in model.modules() if isinstance(m, BackendMixin)}
    if not found:
        return None
    return found.pop() if len(found) == 1 else "mixed"


__all__ = ["accelerate", "backend_of", "check_backend", "model_devices", "ops_used", "OPS"]
