"""Inference fusion: BatchNorm folded into the preceding convolution."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [C_out, C_in, k, k] and bias [C_out] of a conv equal to ``bn(conv(x))`` in eval mode.

    Computed in float64 and returned in the conv weight's dtype.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False); it cannot be folded")
    if conv.out_channels != bn.num_features:
        raise ValueError(f"conv has {conv.out_channels} output channels but bn has {bn.num_features}")
    w = conv.weight.double()
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = -bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    weight = w * scale.reshape(-1, 1, 1, 1)
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


def fuse_for_inference(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Fold every ConvBNMish's BN into its conv, in place; puts ``model`` in eval mode and returns it.

    Args:
        backend: when given, also switch the model's ops to this backend, as :func:`cspmirror.accelerate`
            does: checked first, so that a backend that cannot run the fused model raises
            :class:`cspmirror.BackendUnavailableError` and leaves ``model`` unchanged.
    """
    from .accelerate import check_backend
    from .layers import ConvBNMish

    convs = [module for module in model.modules() if isinstance(module, ConvBNMish)]
    if backend is not None:
        check_backend(model, backend, also=("conv_bn_mish",) if convs else ())
    model.eval()
    for module in convs:
        module.fuse()
    if backend is not None:
        set_backend(model, backend)
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Point every cspmirror module in ``model`` at ``backend``, in place (weights untouched), and load its ops'
    implementations where ``backend`` can run them (:func:`cspmirror.accelerate.preload`: without raising;
    :func:`cspmirror.accelerate` checks first)."""
    from .accelerate import preload
    from .backends import BACKENDS
    from .layers import BackendMixin

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for module in model.modules():
        if isinstance(module, BackendMixin):
            module.backend = backend
    preload(model)
    return model


def set_recompute(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Trade compute for training memory, in place: with ``enabled``, every ConvBNMish whose input is a fused
    ``bn_mish`` output (Triton backend, eager) recomputes that input in its backward instead of keeping it
    (one elementwise pass each; :mod:`cspmirror.ops.recompute`), so a stack of them keeps one activation per
    layer instead of two. ``False`` turns it off everywhere; by default only each dense block's second conv
    recomputes (its input is also kept by nothing else)."""
    from .layers import ConvBNMish

    for module in model.modules():
        if isinstance(module, ConvBNMish):
            module.recompute_input = enabled
    return model
