"""Activation functions shared by the Triton kernels (``@triton.jit`` device helpers only)."""

import triton
import triton.language as tl


@triton.jit
def mish(v):
    """``v * tanh(softplus(v))`` elementwise, in ``v``'s dtype (fp32 or fp64), like ``F.mish``.

    Written with ``exp`` only (no libdevice tanh/log1p, which the interpreter lacks):
    ``tanh(softplus(v)) = n / (n + 2)`` with ``n = e^v (e^v + 2)``. ``mish(v) = v`` for ``v > 20``
    (softplus's threshold), and ``e^v`` is clamped there so that nothing overflows to inf / NaN.
    """
    e = tl.exp(tl.minimum(v, 20.0))
    n = e * (e + 2.0)
    return tl.where(v > 20.0, v, v * (n / (n + 2.0)))
