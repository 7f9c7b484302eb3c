"""Activation functions shared by the Triton kernels (``@triton.jit`` device helpers only).

Mish and its derivative are written with ``exp`` only (no libdevice tanh/log1p, which the interpreter lacks):
``tanh(softplus(v)) = n / (n + 2)`` with ``n = e^v (e^v + 2)``.

``OUT_DTYPE`` is the dtype the result is stored in; fp32 and fp64 get the accurate forms (``ACCURATE``): on the
GPU ``tl.exp`` is ``ex2.approx`` of ``v * log2(e)``, whose relative error grows with ``|v|`` (about 1e-6 at
``|v| = 10``), and ``/`` is an approximate division; in fp32 that made the fused ops several times less accurate
than PyTorch's, enough to show through a whole network's gradients. ACCURATE takes an unbiased, nearly
correctly rounded ``exp`` of our own in fp32 (:func:`_exp_f32`; libdevice's in fp64), IEEE divisions, and
forms with fewer roundings; half-precision tensors keep the fast forms, whose error their rounding hides.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from cspmirror.backends import triton_interpreted

_INTERPRETED = tl.constexpr(triton_interpreted())
# e^v = 2^k e^r with v = k ln2 + r, |r| <= ln2 / 2; ln2 = _LN2_HI + _LN2_LO (Cody-Waite), where _LN2_HI has 15
# significant bits, so k * _LN2_HI is exact for |k| < 512
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2_HI = tl.constexpr(0.693145751953125)
_LN2_LO = tl.constexpr(1.428606765330187e-06)


@triton.jit
def _exp(v, ACCURATE: tl.constexpr):
    if ACCURATE and v.dtype == tl.float32:
        r = _exp_f32(v)
    elif ACCURATE and not _INTERPRETED:
        r = libdevice.exp(v)
    else:
        r = tl.exp(v)
    return r


@triton.jit
def _exp_f32(v):
    """``e^v`` for fp32 ``v <= 88``: about 98.8% of results in [-20, 20] correctly rounded, the rest within 0.57
    ulp, no bias (mean signed error below 0.003 ulp), the same arithmetic on the GPU and in the interpreter.
    libdevice's ``expf`` is good to 2 ulp, numpy's (the interpreter's) to 2.4 ulp with a mean signed error of
    -0.07 ulp: errors that share a sign add up through a network's sums, where independent roundings cancel.

    Range reduction (Cody-Waite) to ``|r| <= ln2 / 2``, ``e^r = 1 + r + r^2 / 2 + r^3 P(r)`` with P from the
    Taylor series to degree 5 (truncation below 0.01 ulp) by Horner's rule, the sum rounded once with ``1 + r``
    and ``r^2 / 2`` carried exactly (``r^2`` only with a fused multiply-add: the interpreter's rounds twice,
    which changed the figures above by under 0.03 ulp), then ``2^k`` in two exact factors so that results below
    2^-126 come out subnormal (or 0 below about e^-104) rather than wrong.
    """
    v = tl.maximum(v, -104.0)
    k = tl.floor(v * _LOG2E + 0.5)
    r = tl.fma(k, -_LN2_HI, v)  # exact: k * _LN2_HI is, and the difference fits in 24 bits
    # e^r = 1 + r + r^2 / 2 + r^3 P(r)
    p = tl.fma(r, 1.0 / 40320.0, 1.0 / 5040.0)
    p = tl.fma(r, p, 1.0 / 720.0)
    p = tl.fma(r, p, 1.0 / 120.0)
    p = tl.fma(r, p, 1.0 / 24.0)
    p = tl.fma(r, p, 1.0 / 6.0)
    r2 = r * r
    r2_lo = tl.fma(r, r, -r2)  # r^2 = r2 + r2_lo exactly (with a fused multiply-add)
    m = 1.0 + r
    # With the rest of the reduced argument, r_lo = -k * _LN2_LO: e^(r + r_lo) = e^r (1 + r_lo (1 + r_lo / 2)).
    # The small terms first; then 1 + r, carried exactly as m + ((1 - m) + r) (Fast2Sum), and r^2 / 2 (exact
    # halves of r2 and r2_lo), all rounded once at the end.
    cubic = r2 * r * p
    r_lo = k * -_LN2_LO
    small = tl.fma(r_lo, (m + (0.5 * r2 + cubic)) * (1.0 + 0.5 * r_lo), cubic + 0.5 * r2_lo)
    m = m + ((((1.0 - m) + r) + 0.5 * r2) + small)
    ki = k.to(tl.int32)
    k1 = ki >> 1
    k2 = ki - k1
    return m * ((k1 + 127) << 23).to(tl.float32, bitcast=True) * ((k2 + 127) << 23).to(tl.float32, bitcast=True)


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
    below 4e32. For very negative ``v``, ``e`` underflows to 0 and so does the result (no NaN, down to
    ``-3.4e38``). At ``v = +-inf`` it is NaN, as PyTorch's (``inf * 0`` in its formula).
    """
    ACCURATE: tl.constexpr = OUT_DTYPE.primitive_bitwidth > 16
    e = _exp(tl.minimum(v, 15.0), ACCURATE)
    t, n, d = _tanh_softplus(e, v, ACCURATE)
    s = 1.0 + e
    if ACCURATE:
        below = v <= -0.5
        vb = tl.maximum(v, -200.0)  # (e is 0 below; 4 v would overflow to -inf, and e * p be NaN, for v < -8.5e37)
        p = tl.fma(tl.fma(e + 4.0, e, 6.0 + 4.0 * vb), e, 4.0 * (1.0 + vb))
        q = _div(tl.where(below, e * p, 4.0 * e * (n + 1.0) * v), tl.where(below, d * d, d * d * s), ACCURATE)
        grad = tl.where(below, q, t + q)
    else:
        grad = (n * d * s + 4.0 * e * (n + 1.0) * v) / (d * d * s)
    # + (v - v): NaN for v = +-inf, as PyTorch's mish backward (v * sigmoid(v) * (1 - t^2) is inf * 0 there).
    return tl.where(v > 15.0, 1.0, grad) + (v - v)
