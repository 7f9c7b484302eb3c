"""Activation functions shared by the Triton kernels (``@triton.jit`` device helpers only).

Mish and its derivative are written with ``exp`` only (no libdevice tanh/log1p, which the interpreter lacks):
``tanh(softplus(v)) = n / (n + 2)`` with ``n = e^v (e^v + 2)``.

``OUT_DTYPE`` is the dtype the result is stored in; fp32 and fp64 get the accurate forms (``ACCURATE``): on the
GPU ``tl.exp`` is ``ex2.approx`` of
``v * log2(e)``, whose relative error grows with ``|v|`` (about 1e-6 at ``|v| = 10``), and ``/`` is an
approximate division; in fp32 that made the fused ops several times less accurate than PyTorch's, enough to
show through a whole network's gradients. ACCURATE takes libdevice's range-reduced ``exp`` and IEEE
divisions, and forms with fewer roundings; half-precision tensors keep the fast forms, whose error their
rounding hides. The interpreter's ``exp`` (numpy) is accurate either way.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from cspmirror.backends import triton_interpreted

_INTERPRETED = tl.constexpr(triton_interpreted())


@triton.jit
def _exp(v, ACCURATE: tl.constexpr):
    if ACCURATE and not _INTERPRETED:
        r = libdevice.exp(v)
    else:
        r = tl.exp(v)
    return r


@triton.jit
def _div(a, b, ACCURATE: tl.constexpr):
    """``a / b``; ACCURATE: correctly rounded (fp64's ``/`` already is; ``tl.div_rn`` takes fp32 only)."""
    if ACCURATE and b.dtype == tl.float32:
        r = tl.div_rn(a, b)
    else:
        r = a / b
    return r


@triton.jit
def _tanh_softplus(e, v, ACCURATE: tl.constexpr):
    """``tanh(softplus(v))`` from ``e = e^v``, and ``n = e (e + 2)``, ``d = n + 2``. ACCURATE: ``1 - 2 / d`` for
    ``v > 0`` and ``e - e^2 (e + 1) / d`` otherwise, each a correction to a term with at most one rounding;
    else ``n / d``."""
    if ACCURATE:
        n = tl.fma(e, e, 2.0 * e)
        d = n + 2.0
        t = tl.where(v > 0.0, 1.0, e) - _div(tl.where(v > 0.0, 2.0, e * e * (e + 1.0)), d, ACCURATE)
    else:
        n = e * (e + 2.0)
        d = n + 2.0
        t = n / d
    return t, n, d


@triton.jit
def mish(v, OUT_DTYPE: tl.constexpr):
    """``v * tanh(softplus(v))`` elementwise, in ``v``'s dtype (fp32 or fp64), like ``F.mish``, for a result
    stored in OUT_DTYPE (see the module doc).

    ``mish(v) = v`` for ``v > 20`` (softplus's threshold), and ``e^v`` is clamped there so that nothing
    overflows to inf / NaN.
    """
    ACCURATE: tl.constexpr = OUT_DTYPE.primitive_bitwidth > 16
    e = _exp(tl.minimum(v, 20.0), ACCURATE)
    t, _, _ = _tanh_softplus(e, v, ACCURATE)
    return tl.where(v > 20.0, v, v * t)


@triton.jit
def mish_grad(v, OUT_DTYPE: tl.constexpr):
    """``d mish / dv`` in fp32: ``t + v * sigmoid(v) * (1 - t^2)`` with ``t = tanh(softplus(v))``, for a
    gradient stored in OUT_DTYPE (see the module doc).

    With ``e = e^v``, ``n = e (e + 2)``, ``d = n + 2``, ``s = 1 + e``: ``t = n / d``,
    ``1 - t^2 = 4 (n + 1) / d^2`` (no cancellation near t = 1) and ``sigmoid(v) = e / s``, so
    ``mish'(v) = t + v * 4 e (n + 1) / (d^2 s)``; as one division, ``(n d s + 4 v e (n + 1)) / (d^2 s)`` (the
    fast form: the backward must stay memory-bound in half precision).

    ACCURATE: that sum for ``v > -1/2``; below, where its two terms cancel (``t ~ e``, ``v * ... ~ v e``:
    3x the rounding error at ``v = -2``), the same expanded as ``e P / d^2`` with
    ``P = ((e + 4) e + 6 + 4 v) e + 4 (1 + v)``, whose terms mostly share a sign. Still two divisions. Mean
    error in float32 ulps against float64, in the interpreter (PyTorch's CPU backward in brackets; see
    tests/test_triton_activations.py): 0.95 (0.6) for ``v < -3``, 1.0 (1.6-2.0) in [-3, -0.5) but for the root,
    0.7 (0.6) in [-0.5, 0), 0.2-0.3 (0.4-1.1) above.

    For ``v > 15`` the derivative is 1 in fp32 (``1 - t^2 < 1e-12``); clamping ``e`` there keeps ``d^2 s``
    below 4e32. For very negative ``v``, ``e`` underflows to 0 and so does the result (no NaN).
    """
    ACCURATE: tl.constexpr = OUT_DTYPE.primitive_bitwidth > 16
    e = _exp(tl.minimum(v, 15.0), ACCURATE)
    t, n, d = _tanh_softplus(e, v, ACCURATE)
    s = 1.0 + e
    if ACCURATE:
        below = v <= -0.5
        p = tl.fma(tl.fma(e + 4.0, e, 6.0 + 4.0 * v), e, 4.0 * (1.0 + v))
        q = _div(tl.where(below, e * p, 4.0 * e * (n + 1.0) * v), tl.where(below, d * d, d * d * s), ACCURATE)
        grad = tl.where(below, q, t + q)
    else:
        grad = (n * d * s + 4.0 * v * e * (n + 1.0)) / (d * d * s)
    return tl.where(v > 15.0, 1.0, grad)
