"""The table of fused-op benchmark cases, shared by ``python -m bench --suite ops`` and ``pytest bench/``.

A case is an op on one shape; building it on a device gives a :class:`Workload`: the op as a function of
its tensors for any backend, the tensors, the fewest bytes it must move (each input read once, each output
written once) and, for the convolution, its arithmetic and the unfused eager baseline
(``conv2d -> batch_norm -> mish``, cuDNN on the GPU).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from cspmirror import fold_bn, get_model, ops
from cspmirror.layers import ConvBNMish

OVERLAP = 0.25


@dataclass
class Workload:
    """One op on one shape, ready to run.

    ``fn(backend, *args)`` runs the public op; ``baseline(*args)`` (convolution only) runs the unfused
    eager ``conv -> BN -> Mish`` on ``baseline_args``. ``grad_args`` are the positions in ``args`` that the
    backward differentiates with respect to (empty: no backward).
    """

    fn: Callable[..., torch.Tensor]
    args: tuple
    fwd_bytes: int
    bwd_bytes: int = 0
    grad_args: tuple[int, ...] = ()
    flops: float = 0.0
    baseline: Callable[..., torch.Tensor] | None = None
    baseline_args: tuple = ()


@dataclass(frozen=True)
class OpCase:
    """One row of the table: an op, a label for its shape, and how to build it.

    ``compile_baseline``: whether the ``compile`` variant runs for this case (it is costly for
    convolutions under max-autotune, so only a few representative layers get it).
    """

    op: str
    label: str
    build: Callable[[torch.device, torch.dtype], Workload] = field(compare=False, repr=False)
    directions: tuple[str, ...] = ("fwd", "bwd")
    compile_baseline: bool = True
    weight: float = 1.0  # how often the shape occurs in the model (for conv layers)

    @property
    def name(self) -> str:
        return f"{self.op}[{self.label}]"


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def split_width(length: int, overlap: float = OVERLAP) -> int:
    """Width of each part of a split (SPEC §1.1)."""
    half = (length + 1) // 2
    return min(half + math.floor(overlap * half), length)


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """BatchNorm parameters stay fp32 for half inputs (as ``nn.BatchNorm2d`` under autocast)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ------------------------------------------------------------------------------------------ workloads


def mirror_split_workload(shape: Sequence[int], device: torch.device, dtype: torch.dtype,
                          layout: torch.memory_format = torch.contiguous_format) -> Workload:
    """x [N, C, H, W] split along W (mirrored), in ``layout``."""
    x = torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    n, c, h, w = shape
    y_numel = 2 * n * c * h * split_width(w)

    def fn(backend: str, x: torch.Tensor) -> torch.Tensor:
        return ops.mirror_split(x, OVERLAP, -1, True, backend=backend)

    moved = nbytes(x) + y_numel * x.element_size()
    return Workload(fn, (x,), moved, moved, grad_args=(0,))


def mirror_fuse_workload(shape: Sequence[int], device: torch.device, dtype: torch.dtype,
                         layout: torch.memory_format = torch.contiguous_format) -> Workload:
    """Two parts [2N, C/2, H, P] (bypass and processed halves of a stage) fused into [N, C, H, W], in
    ``layout``."""
    n, c, h, w = shape
    p = split_width(w)
    parts = [torch.randn(2 * n, c // 2, h, p, device=device, dtype=dtype).contiguous(memory_format=layout)
             for _ in range(2)]

    def fn(backend: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ops.mirror_fuse([a, b], w, OVERLAP, -1, True, "sum", backend=backend)

    moved = nbytes(*parts) + n * c * h * w * parts[0].element_size()
    return Workload(fn, tuple(parts), moved, moved, grad_args=(0, 1))


def bn_params(c: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """weight, bias, running_mean, running_var of a BatchNorm over ``c`` channels, not at their init."""
    pd = param_dtype(dtype)
    weight = torch.rand(c, device=device, dtype=pd) + 0.5
    bias = torch.randn(c, device=device, dtype=pd) * 0.1
    mean = torch.randn(c, device=device, dtype=pd) * 0.1
    var = torch.rand(c, device=device, dtype=pd) + 0.5
    return weight, bias, mean, var


def bn_mish_workload(shape: Sequence[int], device: torch.device, dtype: torch.dtype, training: bool,
                     layout: torch.memory_format = torch.contiguous_format) -> Workload:
    """``bn_mish`` on x in ``layout``; the running statistics are arguments too (updated in place when
    training)."""
    x = torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    weight, bias, mean, var = bn_params(shape[1], device, dtype)

    def fn(backend: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
           var: torch.Tensor) -> torch.Tensor:
        return ops.bn_mish(x, weight, bias, mean, var, training, 0.1, 1e-5, backend=backend)

    params = nbytes(weight, bias, mean, var)
    args = (x, weight, bias, mean, var)
    if training:  # read x, params, stats; write y and the running stats
        fwd = 2 * nbytes(x) + params + nbytes(mean, var)
        bwd = 3 * nbytes(x) + 2 * nbytes(weight, bias) + nbytes(mean, var)  # x, dy in; dx, dw, db out
        return Workload(fn, args, fwd, bwd, grad_args=(0, 1, 2))
    return Workload(fn, args, 2 * nbytes(x) + params)


@dataclass(frozen=True)
class ConvLayer:
    """A distinct convolution of a model: input shape, output channels, kernel, stride, residual."""

    x_shape: tuple[int, int, int, int]
    c_out: int
    kernel: int
    stride: int
    residual: bool
    count: int = 1

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        n, _, h, w = self.x_shape
        pad = self.kernel // 2
        return (n, self.c_out, (h + 2 * pad - self.kernel) // self.stride + 1,
                (w + 2 * pad - self.kernel) // self.stride + 1)

    @property
    def flops(self) -> float:
        """2 x MACs of one call."""
        n, co, ho, wo = self.out_shape
        return 2.0 * n * co * ho * wo * self.x_shape[1] * self.kernel ** 2

    @property
    def label(self) -> str:
        n, c, h, w = self.x_shape
        res = "+res" if self.residual else ""
        return f"{n}x{c}x{h}x{w} k{self.kernel}s{self.stride}->{self.c_out}{res}"


def conv_layers(model_name: str, batch: int, resolution: int) -> list[ConvLayer]:
    """The distinct ConvBNMish layers of ``model_name`` on a ``batch x 3 x resolution^2`` input, heaviest
    first (MACs x occurrences), found by running the model on the meta device."""
    model = get_model(model_name).to("meta").eval()
    seen: collections.Counter = collections.Counter()

    def hook(module: ConvBNMish, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        residual = kwargs.get("residual", args[1] if len(args) > 1 else None)
        conv = module.conv
        key = (tuple(args[0].shape), conv.out_channels, conv.kernel_size[0], conv.stride[0], residual is not None)
        seen[key] += 1

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, ConvBNMish)]
    with torch.no_grad():
        model(torch.empty(batch, 3, resolution, resolution, device="meta"))
    for h in handles:
        h.remove()
    layers = [ConvLayer(*key, count=n) for key, n in seen.items()]
    return sorted(layers, key=lambda l: -l.flops * l.count)


def representative(layers: Sequence[ConvLayer], k: int) -> list[ConvLayer]:
    """Up to ``k`` layers, the heaviest of each (kernel, stride) kind first, then the next heaviest."""
    firsts, rest, kinds = [], [], set()
    for layer in layers:
        kind = (layer.kernel, layer.stride)
        (rest if kind in kinds else firsts).append(layer)
        kinds.add(kind)
    return (firsts + rest)[:k]


def conv_workload(layer: ConvLayer, device: torch.device, dtype: torch.dtype) -> Workload:
    """``conv_bn_mish`` with BN folded (the fused op) and the unfused eager baseline on the same data.

    Inputs are channels_last, the layout the layers see in a fused model (its first layer converts once; every
    ``conv_bn_mish`` output is channels_last) and cuDNN's fast layout for half-precision convolutions, and so
    are the weights, as in a model moved to channels_last: every variant, the eager baseline included, gets
    the same tensors."""
    _, c_in, _, _ = layer.x_shape
    conv = nn.Conv2d(c_in, layer.c_out, layer.kernel, layer.stride, layer.kernel // 2, bias=False)
    bn = nn.BatchNorm2d(layer.c_out).eval()
    with torch.no_grad():
        targets = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        for t, v in zip(targets, bn_params(layer.c_out, torch.device("cpu"), torch.float32), strict=True):
            t.copy_(v)
    weight, bias = fold_bn(conv, bn)
    x = torch.randn(*layer.x_shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    residual = (torch.randn(*layer.out_shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
                if layer.residual else None)
    cl = torch.channels_last  # the weights of a channels_last model (model.to(memory_format=channels_last))
    w, b = weight.to(device, dtype).contiguous(memory_format=cl), bias.to(device, dtype)
    raw_w = conv.weight.detach().to(device, dtype).contiguous(memory_format=cl)
    bn_w, bn_b, bn_m, bn_v = (t.detach().to(device, param_dtype(dtype))
                              for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    stride = layer.stride

    def fn(backend: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
           residual: torch.Tensor | None) -> torch.Tensor:
        return ops.conv_bn_mish(x, w, b, stride, residual, backend=backend)

    def baseline(x: torch.Tensor, raw_w: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        y = F.conv2d(x, raw_w, None, stride, raw_w.shape[-1] // 2)
        y = F.mish(F.batch_norm(y, bn_m, bn_v, bn_w, bn_b, False, 0.0, 1e-5))
        return y if residual is None else y + residual

    y_bytes = math.prod(layer.out_shape) * x.element_size()
    moved = nbytes(x, w, b, residual) + y_bytes
    return Workload(fn, (x, w, b, residual), moved, flops=layer.flops, baseline=baseline,
                    baseline_args=(x, raw_w, residual))


# ------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Shapes:
    """Sizes of one suite: mirror ops, bn_mish, and which model's conv layers at which batch/resolution."""

    mirror: tuple[int, int, int, int]
    bn: tuple[int, int, int, int]
    conv_model: str
    conv_batch: int
    conv_resolution: int


GPU_SHAPES = Shapes((64, 256, 64, 64), (32, 256, 64, 64), "cspmirrornet53", 32, 256)
GPU_QUICK_SHAPES = Shapes((16, 128, 64, 64), (16, 128, 64, 64), "cspmirrornet53", 8, 128)
CPU_SHAPES = Shapes((16, 64, 64, 64), (16, 64, 64, 64), "cspmirrornet53", 4, 128)
CPU_QUICK_SHAPES = Shapes((8, 64, 32, 32), (8, 64, 32, 32), "cspmirrornet53", 2, 64)


def shapes_for(device: torch.device, quick: bool) -> Shapes:
    if device.type == "cuda":
        return GPU_QUICK_SHAPES if quick else GPU_SHAPES
    return CPU_QUICK_SHAPES if quick else CPU_SHAPES


def fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def op_cases(shapes: Shapes, max_layers: int | None = None, compile_layers: int = 3) -> list[OpCase]:
    """Every fused op, forward and backward where defined, then the model's conv layers (heaviest first;
    the ``compile_layers`` most representative ones also get the torch.compile baseline)."""
    m, b = shapes.mirror, shapes.bn
    cl = torch.channels_last
    cases = [
        OpCase("mirror_split", fmt_shape(m), lambda d, t: mirror_split_workload(m, d, t)),
        OpCase("mirror_fuse", fmt_shape(m), lambda d, t: mirror_fuse_workload(m, d, t)),
        OpCase("mirror_split", f"{fmt_shape(m)} channels_last", lambda d, t: mirror_split_workload(m, d, t, cl)),
        OpCase("mirror_fuse", f"{fmt_shape(m)} channels_last", lambda d, t: mirror_fuse_workload(m, d, t, cl)),
        OpCase("bn_mish_train", fmt_shape(b), lambda d, t: bn_mish_workload(b, d, t, True)),
        OpCase("bn_mish_eval", fmt_shape(b), lambda d, t: bn_mish_workload(b, d, t, False), ("fwd",)),
    ]
    layers = conv_layers(shapes.conv_model, shapes.conv_batch, shapes.conv_resolution)
    compiled = set(representative(layers, compile_layers))
    ordered = sorted(layers, key=lambda l: (l not in compiled, -l.flops * l.count))
    for layer in ordered[:max_layers]:
        cases.append(OpCase("conv_bn_mish", layer.label, lambda d, t, l=layer: conv_workload(l, d, t),
                            ("fwd",), compile_baseline=layer in compiled, weight=layer.count))
    return cases
