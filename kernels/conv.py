"""Implicit-GEMM conv2d with a fused ``mish(acc + bias) (+ residual)`` epilogue, and the same epilogue as a
standalone elementwise kernel (for the cuDNN-conv path).

The GEMM view of a ``k x k`` conv (padding ``k // 2``): rows ``m`` are output pixels ``(n, oh, ow)``
(``M = N * H_out * W_out``), columns are output channels, and the reduction runs over ``(kh, kw, c_in)``
(``K = k * k * C_in``). Activations are read in place through their strides (channels_last makes the
``c_in`` run contiguous); the weight is read as channels_last, i.e. ``[C_out, K]`` with ``K`` contiguous: both
GEMM operands then run along the reduction ("TN"), the layout Hopper's tensor cores (wgmma) take from shared
memory in every dtype (tf32 takes no other: a ``C_out``-contiguous weight would be loaded 4 bytes at a time).
The reduction is ONE flattened loop over (tap, channel block), so that the software pipeline (``num_stages``)
spans all taps even when ``C_in`` fits in one block; because such a flattened 3x3 loop has miscompiled with
``num_warps=8`` (PyTorch issue 173068), 3x3 launches only use configs with <= 4 warps.

All offsets into activations / outputs are computed in int64, so tensors may exceed 2^31 elements; the
implicit GEMM needs fewer than ``MAX_GEMM_ROWS`` output pixels (the epilogue kernel has no such limit).
"""

import inspect
import os

import torch
import triton
import triton.language as tl

from cspmirror.backends import triton_interpreted

from .activations import mish
from .launch import cdiv, next_power_of_2, on_device

INTERPRETED = triton_interpreted()
# Output pixels (GEMM rows) and weight offsets are int32 in the implicit GEMM; element offsets are int64.
MAX_GEMM_ROWS = 2**31 - 1024
_INTERPRETED = tl.constexpr(INTERPRETED)


def _config(block_m: int, block_n: int, block_k: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


# Hopper (sm_90) candidates, best first, pruned per shape by _prune_configs (each kept one costs a compile and
# a benchmark per new shape). 8-warp configs are for 1x1 only.
_GPU_CONFIGS = [
    _config(128, 128, 64, 3, 4),
    _config(128, 128, 32, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(128, 64, 32, 4, 4),
    _config(128, 32, 64, 4, 4),
    _config(64, 64, 64, 3, 4),
    _config(64, 32, 32, 4, 4),
    _config(128, 256, 64, 3, 8),
    _config(256, 128, 64, 3, 8),
]
# The interpreter benchmarks every config it is given: exactly one, small enough for tiny test shapes.
_INTERPRETER_CONFIGS = [_config(64, 32, 32, 1, 4)]
# Set to "0" to skip autotuning: the first config that fits the shape runs (quick compiles for tests).
AUTOTUNE_ENV = "CSPMIRROR_CONV_AUTOTUNE"
_BIG_M = 65536  # enough 128-row tiles to fill the GPU: 64-row tiles only lose there
_FMA_TILE = 128 * 64 * 32  # exact fp32 (ieee) runs on FMA units: big tiles only bloat the compile
_HOPPER_SHARED = 227 * 1024  # shared memory a block may use on sm_90, where the device does not say


def _shared_bytes(config: triton.Config, element_size: int) -> int:
    """Shared memory of a config: its ``num_stages`` buffers of the A and B tiles (what Triton allocates
    for this kernel on Hopper; the epilogue reuses it)."""
    meta = config.kwargs
    return config.num_stages * (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] * element_size


def _fits(config: triton.Config, k_size: int, m: int, c_in: int, c_out: int, ieee: bool,
          shared: int = 0) -> bool:
    """Whether ``config`` suits the problem; ``shared``: the bytes of shared memory it needs (see
    :func:`_shared_bytes`), checked against the device's limit."""
    meta = config.kwargs
    block_m, block_n, block_k = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    n_pow2 = next_power_of_2(c_out)
    return ((k_size == 1 or config.num_warps <= 4)
            and (block_m >= 128 or m < _BIG_M)
            and block_m <= max(64, next_power_of_2(m))
            and min(64, n_pow2) <= block_n <= max(32, n_pow2)
            and block_k <= max(32, next_power_of_2(c_in))
            and (not ieee or block_m * block_n * block_k <= _FMA_TILE)
            and shared <= _HOPPER_SHARED)


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Keep the configs whose tiles suit the problem (<= 4 warps for 3x3) and whose buffers fit in shared
    memory (a config that does not would cost a compile, then fail to launch); the first one only when
    ``CSPMIRROR_CONV_AUTOTUNE=0``."""
    args = {**named_args, **kwargs}
    k_size, m, c_in, c_out = args["K_SIZE"], args["M"], args["C_in"], args["C_out"]
    size = args["x_ptr"].element_size()
    kept = [c for c in configs
            if _fits(c, k_size, m, c_in, c_out, args["PRECISION"] == "ieee", _shared_bytes(c, size))]
    if not kept:
        small = [c for c in configs if c.num_warps <= 4]
        kept = [min(small, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return kept[:1] if os.environ.get(AUTOTUNE_ENV, "1") == "0" else kept


@triton.jit
def _pixel_coords(rm, HW, W):
    """Row indices [BLOCK_M] of a flattened N*H*W pixel axis -> (n, h, w), each [BLOCK_M]."""
    n = rm // HW
    rest = rm - n * HW
    h = rest // W
    return n, h, rest - h * W


@triton.jit
def _nchw_offsets(n, h, w, c, s_n, s_c, s_h, s_w):
    """int64 element offsets [BLOCK_M, BLOCK_N] of pixels (n, h, w) [BLOCK_M] x channels c [BLOCK_N]."""
    row = n.to(tl.int64) * s_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w
    return row[:, None] + c.to(tl.int64)[None, :] * s_c


@triton.jit
def _bf16_bits_rtne(v):
    """fp32 -> the 16 bits of the nearest bf16 (ties to even); finite inputs."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16)


@triton.jit
def _mish_store(acc, rm, rn, M, C, HW, W, bias_ptr, res_ptr, rs_n, rs_c, rs_h, rs_w,
                out_ptr, os_n, os_c, os_h, os_w, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """out[pixels rm, channels rn] = mish(acc + bias) (+ residual); acc [BLOCK_M, BLOCK_N] in fp32/fp64."""
    n, h, w = _pixel_coords(rm, HW, W)
    col_ok = rn < C
    mask = (rm < M)[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(acc.dtype)[None, :]
    y = mish(acc, out_ptr.dtype.element_ty)
    if HAS_RES:
        res_offsets = _nchw_offsets(n, h, w, rn, rs_n, rs_c, rs_h, rs_w)
        y = y + tl.load(res_ptr + res_offsets, mask=mask, other=0.0).to(acc.dtype)
    out_offsets = _nchw_offsets(n, h, w, rn, os_n, os_c, os_h, os_w)
    if _INTERPRETED and out_ptr.dtype.element_ty == tl.bfloat16:
        # The interpreter's fp32 -> bf16 cast truncates; round to nearest even by hand there.
        bits_ptr = out_ptr.to(tl.pointer_type(tl.uint16), bitcast=True)
        tl.store(bits_ptr + out_offsets, _bf16_bits_rtne(y.to(tl.float32)), mask=mask)
    else:
        tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def _bench_config(kernel_call, quantiles):
    """Time one candidate config briefly: a model's layer shapes are all tuned at their first call, and
    Triton's default (25 ms warm-up, 100 ms of runs per config) makes that minutes for a whole network."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _autotune_options() -> dict:
    """Brief timings, kept on disk across processes, where this Triton's ``autotune`` takes the options."""
    accepted = inspect.signature(triton.autotune).parameters
    options = {"do_bench": _bench_config, "cache_results": True}
    return {name: value for name, value in options.items() if name in accepted}


# The key holds every argument _prune_configs reads (Triton adds the tensors' dtypes): a config found for one key
# is reused, unpruned, for every later call with that key (PRECISION: ieee takes only small FMA tiles).
@triton.autotune(configs=_INTERPRETER_CONFIGS if INTERPRETED else _GPU_CONFIGS,
                 key=["M", "C_in", "C_out", "K_SIZE", "STRIDE", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_configs}, **_autotune_options())
# Sizes that only bound rows (pixels) are not specialized: a layer of another resolution reuses the binary.
# C_in and C_out stay specialized: their divisibility lets the channel masks keep 16-byte accesses.
@triton.jit(do_not_specialize=["M", "H", "W", "H_out", "W_out"])
def _conv_mish_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    M, C_in, H, W, C_out, H_out, W_out,
    xs_n, xs_c, xs_h, xs_w, rs_n, rs_c, rs_h, rs_w, os_n, os_c, os_h, os_w,
    K_SIZE: tl.constexpr, STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each weight column tile while it is hot in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(C_out, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    HW_out = H_out * W_out
    n, oh, ow = _pixel_coords(rm, HW_out, W_out)
    ih0 = oh * STRIDE - K_SIZE // 2
    iw0 = ow * STRIDE - K_SIZE // 2
    row_ok = rm < M
    x_rows = x_ptr + (n.to(tl.int64) * xs_n + ih0.to(tl.int64) * xs_h + iw0.to(tl.int64) * xs_w)
    col_ok = rn < C_out

    c_blocks = tl.cdiv(C_in, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, K_SIZE * K_SIZE * c_blocks):
        if K_SIZE == 1:
            tap = 0
            c0 = it * BLOCK_K
            a_rows = x_rows
            a_ok = row_ok
        else:
            tap = it // c_blocks
            c0 = (it - tap * c_blocks) * BLOCK_K
            kh = tap // K_SIZE
            kw = tap - kh * K_SIZE
            ih = ih0 + kh
            iw = iw0 + kw
            a_rows = x_rows + (kh * xs_h + kw * xs_w)
            a_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ck = c0 + rk
        k_ok = ck < C_in
        a = tl.load(a_rows[:, None] + ck[None, :] * xs_c, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + rn[None, :] * (K_SIZE * K_SIZE * C_in) + (tap * C_in + ck)[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:  # the interpreter keeps bf16 as raw int16: dot in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    _mish_store(acc, rm, rn, M, C_out, HW_out, W_out, bias_ptr, res_ptr, rs_n, rs_c, rs_h, rs_w,
                out_ptr, os_n, os_c, os_h, os_w, HAS_BIAS, HAS_RES)


@triton.jit
def _mish_epilogue_kernel(
    y_ptr, bias_ptr, res_ptr, out_ptr, M, C, HW, W,
    ys_n, ys_c, ys_h, ys_w, rs_n, rs_c, rs_h, rs_w, os_n, os_c, os_h, os_w,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # M may pass 2^31 here
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n, h, w = _pixel_coords(rm, HW, W)
    mask = (rm < M)[:, None] & (rn < C)[None, :]
    y = tl.load(y_ptr + _nchw_offsets(n, h, w, rn, ys_n, ys_c, ys_h, ys_w), mask=mask, other=0.0)
    if FP64:
        y = y.to(tl.float64)
    else:
        y = y.to(tl.float32)
    _mish_store(y, rm, rn, M, C, HW, W, bias_ptr, res_ptr, rs_n, rs_c, rs_h, rs_w,
                out_ptr, os_n, os_c, os_h, os_w, HAS_BIAS, HAS_RES)


def _unit_stride(bias: torch.Tensor | None) -> torch.Tensor | None:
    """``bias`` as the kernels read it, ``bias_ptr + channel``: contiguous (a no-op for a parameter; a copy for a
    strided view such as ``b[::2]``)."""
    return None if bias is None else bias.contiguous()


def _strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def conv_mish(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              residual: torch.Tensor | None, out: torch.Tensor, stride: int, tf32: bool) -> None:
    """``out = mish(conv2d(x, weight, bias, stride, padding=k // 2)) (+ residual)`` by implicit GEMM.

    Args:
        x: [N, C_in, H, W], any strides (channels_last reads coalesced). fp32 / fp16 / bf16.
        weight: [C_out, C_in, k, k], k in (1, 3), dense channels_last.
        bias: [C_out] or None. residual: [N, C_out, H_out, W_out] or None, any strides.
        out: [N, C_out, H_out, W_out], any strides (e.g. a channel slice), written in place.
        tf32: for fp32 inputs, multiply in tf32 (else exact fp32, ``input_precision="ieee"``).
    """
    batch, c_in, h, w = x.shape
    _, c_out, h_out, w_out = out.shape
    k = weight.shape[-1]
    m = batch * h_out * w_out
    if m >= MAX_GEMM_ROWS or weight.numel() >= 2**31:
        raise ValueError(f"conv_mish: N*H_out*W_out = {m} output pixels and the weight "
                         f"({weight.numel()} elements) must each stay below {MAX_GEMM_ROWS}")
    if not weight.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("conv_mish: weight must be dense channels_last ([C_out, k * k * C_in], K contiguous)")

    def grid(meta: dict) -> tuple[int]:
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(c_out, meta["BLOCK_N"]),)

    precision = "tf32" if (tf32 or x.dtype != torch.float32) else "ieee"
    bias = _unit_stride(bias)
    with on_device(out.device):
        _conv_mish_kernel[grid](
            x, weight, bias, residual, out, m, c_in, h, w, c_out, h_out, w_out,
            *_strides(x), *_strides(residual), *_strides(out),
            K_SIZE=k, STRIDE=stride, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
            PRECISION=precision, DOT_FP32=INTERPRETED,
        )


def mish_epilogue(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                  out: torch.Tensor) -> None:
    """``out = mish(y + bias) (+ residual)`` elementwise; y, residual, out: [N, C, H, W], any strides.

    Computes in fp32 (fp64 for fp64 ``y``); ``bias`` [C] or None.
    """
    batch, c, h, w = y.shape
    m = batch * h * w
    bias = _unit_stride(bias)
    block_n = min(128, max(16, next_power_of_2(c)))
    block_m = 4096 // block_n
    grid = (cdiv(m, block_m), cdiv(c, block_n))
    with on_device(out.device):
        _mish_epilogue_kernel[grid](
            y, bias, residual, out, m, c, h * w, w,
            *_strides(y), *_strides(residual), *_strides(out),
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, FP64=y.dtype == torch.float64,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )
