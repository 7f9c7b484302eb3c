"""FLOP counts of the fused convolution for ``torch.utils.flop_counter.FlopCounterMode``.

A fast backend's ``conv_bn_mish`` reaches a dispatch mode as one opaque op (the convolution runs inside it),
which the counter would count as 0 FLOPs. Registered here, it counts as the convolution it contains, like the
reference backend's ``aten.convolution`` (bias, Mish and residual are not counted, as ATen's are not).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils import flop_counter

from ._validate import conv_output_shape


def conv_bn_mish_flops(x_shape: Sequence[int], weight_shape: Sequence[int], _bias_shape: object, stride: int,
                       *_args: object, **_kwargs: object) -> int:
    """FLOPs of ``conv2d(x, weight, stride, padding=k // 2)``: x [N, C_in, H, W], weight [C_out, C_in, k, k]."""
    out_shape = conv_output_shape(x_shape, weight_shape, stride)
    return flop_counter.conv_flop_count(list(x_shape), list(weight_shape), list(out_shape))


def register_conv_flops(*ops: object) -> None:
    """Count each of ``ops`` (``torch.ops.<namespace>.<name>`` packets whose arguments start with
    ``x, weight, bias, stride``) as :func:`conv_bn_mish_flops`."""
    flop_counter.register_flop_formula(list(ops))(conv_bn_mish_flops)
