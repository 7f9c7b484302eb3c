"""Fused BatchNorm + Mish (+ residual) in Triton: device code and launch helpers.

Every [N, C, H, W] tensor of one call is walked as a 3-D view ``[A, C, B]`` with element strides
``(s_a, s_c, s_b)``: either ``A = 1, B = N*H*W`` (N, H and W merge, e.g. channels_last or C == 1) or
``A = N, B = H*W`` (H and W merge, e.g. NCHW). A tile is ``[BLOCK_C, BLOCK_B]``; Triton coalesces along
whichever of the two axes has unit stride (the compiler specializes a stride equal to 1), so loads are
vectorized in both layouts. Channel slices of a larger buffer (``out=``) keep the same view, only with a
larger stride.

Passes over memory (x: the input, y: the output, dy / dx: their gradients):

- training forward: ``_stats_kernel`` reads x once and writes per-program partials; ``_stats_finalize_kernel``
  combines them in a fixed order (no atomics: deterministic) into the mean and biased variance and updates
  the running statistics; ``_apply_kernel`` reads x (+ residual) and writes y.
- eval forward: ``_apply_kernel`` only, from the running statistics.
- training backward: ``_backward_kernel`` reads x and dy for the per-channel sums of ``g = dy * mish'(v)`` and
  ``g * x_hat``; ``_sum_partials_kernel`` adds the partials in order; ``_backward_kernel`` reads x and dy again
  and writes dx.
- eval backward: one ``_backward_kernel`` pass writes dx and the partial sums for the weight and bias grads.

Mean and variance are passed as [C] tensors of any float dtype; every kernel derives
``rstd = 1 / sqrt(var + eps)`` from them the same way. Everything is computed in fp32.

Statistics stay accurate for large means (|mean| >> std): each reduction program subtracts a shift (its first
tile's mean) before summing, and reports the shift, its mean minus the shift and its M2 separately; the
finalize step merges the programs with the parallel-variance formula around one shift. (A mean of 1e4 with
std 1e-2 keeps a variance accurate to ~1e-7, where fp32 sums of x and x^2 are off by 1e5 times.)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from cspmirror.backends import triton_interpreted

from .activations import mish
from .launch import cdiv, next_power_of_2

INTERPRETED = triton_interpreted()
INTERPRETED_BF16_FIX = tl.constexpr(INTERPRETED)
# Elements per tile, warps per program. The interpreter runs one program at a time on numpy arrays.
TILE = 4096
NUM_WARPS = 8
# Channels per tile when C is the contiguous axis (64 bf16 = one 128-byte line).
BLOCK_C_CONTIGUOUS = 64
# Reduction programs to aim for per SM (GPU) or in all (interpreter).
PROGRAMS_PER_SM = 8
INTERPRETER_PROGRAMS = 4
FINALIZE_BLOCK = 256
# Offsets beyond this need int64 index arithmetic.
INT32_LIMIT = 2**31 - 1


# --- device code ---------------------------------------------------------------------------------------------

@triton.jit
def mish_grad(v):
    """``d mish / dv`` in fp32: ``t + v * sigmoid(v) * (1 - t^2)`` with ``t = tanh(softplus(v))``.

    With ``e = e^v``, ``n = e (e + 2)``, ``d = n + 2``, ``s = 1 + e``: ``t = n / d``,
    ``1 - t^2 = 4 (n + 1) / d^2`` (no cancellation near t = 1) and ``sigmoid(v) = e / s``, so
    ``mish'(v) = (n d s + 4 v e (n + 1)) / (d^2 s)``: one division (the backward must stay memory-bound).
    For ``v > 15`` the derivative is 1 in fp32 (``1 - t^2 < 1e-12``); clamping ``e`` there keeps ``d^2 s``
    below 4e32. For very negative ``v``, ``e`` underflows to 0 and so does the result (no NaN).
    """
    e = tl.exp(tl.minimum(v, 15.0))
    n = e * (e + 2.0)
    d = n + 2.0
    s = 1.0 + e
    grad = (n * d * s + 4.0 * v * e * (n + 1.0)) / (d * d * s)
    return tl.where(v > 15.0, 1.0, grad)


@triton.jit
def _tile(item, nbb, C, B, pid_c, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr):
    """Indices of tile ``item`` (``a * nbb + b_block``) of channel block ``pid_c``: (a, offs_c, offs_b, mask)."""
    a = item // nbb
    offs_b = (item - a * nbb) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_c < C)[:, None] & (offs_b < B)[None, :]
    if IDX64:
        a = a.to(tl.int64)
        offs_b = offs_b.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    return a, offs_c[:, None], offs_b[None, :], mask


@triton.jit
def _load(ptr, a, c, b, sa, sc, sb, mask):
    # Cast at once: the interpreter holds bf16 as raw 16-bit integers.
    return tl.load(ptr + a * sa + c * sc + b * sb, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _cast_for(ptr, value):
    """fp32 ``value`` in ``ptr``'s element type, rounded to nearest even."""
    if INTERPRETED_BF16_FIX:
        if ptr.dtype.element_ty == tl.bfloat16:
            # The interpreter truncates fp32 -> bf16; round first (on the GPU, cvt.rn does).
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            value = bits.to(tl.float32, bitcast=True)
    return value.to(ptr.dtype.element_ty)


@triton.jit
def _store(ptr, a, c, b, sa, sc, sb, mask, value):
    tl.store(ptr + a * sa + c * sc + b * sb, _cast_for(ptr, value), mask=mask)


@triton.jit
def _items_of(split, ipp, items):
    """The tiles ``[start, end)`` of reduction program ``split``."""
    start = split * ipp
    return start, tl.minimum(start + ipp, items)


@triton.jit
def _count(start, end, nbb, B, BLOCK_B: tl.constexpr):
    """Valid elements per channel in tiles [start, end): every tile is full except the last of each ``a``."""
    lasts = end // nbb - start // nbb
    return (end - start) * BLOCK_B - lasts * (nbb * BLOCK_B - B)


@triton.jit
def _channel(ptr, pid_c, C, BLOCK_C: tl.constexpr, default):
    """Per-channel fp32 vector [BLOCK_C, 1] of ``ptr`` (``default`` where ``ptr`` is absent)."""
    offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if ptr is None:
        value = tl.full([BLOCK_C], default, tl.float32)
    else:
        value = tl.load(ptr + offs, mask=offs < C, other=default).to(tl.float32)
    return value[:, None]


@triton.jit
def _channel_rstd(var_ptr, pid_c, C, eps, BLOCK_C: tl.constexpr):
    """``1 / sqrt(var + eps)`` [BLOCK_C, 1]: forward and backward compute it alike, from the same var."""
    return 1.0 / tl.sqrt(_channel(var_ptr, pid_c, C, BLOCK_C, 1.0) + eps)


@triton.jit
def _stats_kernel(
    x_ptr, pshift_ptr, poff_ptr, pm2_ptr, C, B, nbb, items, ipp, sxa, sxc, sxb,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr,
):
    """Per program and channel, over the program's tiles: the shift (its first tile's mean), the mean minus
    the shift, and M2 (the sum of squared deviations from the mean) -> [splits, C] each. Keeping the mean as
    shift + offset keeps its low bits, which the merge of large means needs."""
    split = tl.program_id(0)
    pid_c = tl.program_id(1)
    start, end = _items_of(split, ipp, items)
    # Shift by the first tile's mean so that the fp32 sums below do not cancel for large means.
    a, c, b, mask = _tile(start, nbb, C, B, pid_c, BLOCK_C, BLOCK_B, IDX64)
    first = _load(x_ptr, a, c, b, sxa, sxc, sxb, mask)
    shift = tl.sum(first, axis=1) / _count(start, start + 1, nbb, B, BLOCK_B).to(tl.float32)
    acc1 = tl.where(mask, first - shift[:, None], 0.0)
    acc2 = acc1 * acc1
    for item in range(start + 1, end):
        a, c, b, mask = _tile(item, nbb, C, B, pid_c, BLOCK_C, BLOCK_B, IDX64)
        d = tl.where(mask, _load(x_ptr, a, c, b, sxa, sxc, sxb, mask) - shift[:, None], 0.0)
        acc1 += d
        acc2 += d * d
    n = _count(start, end, nbb, B, BLOCK_B).to(tl.float32)
    s1 = tl.sum(acc1, axis=1)
    s2 = tl.sum(acc2, axis=1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    tl.store(pshift_ptr + split * C + offs_c, shift, mask=mask_c)
    tl.store(poff_ptr + split * C + offs_c, s1 / n, mask=mask_c)
    tl.store(pm2_ptr + split * C + offs_c, tl.maximum(s2 - s1 * (s1 / n), 0.0), mask=mask_c)


@triton.jit
def _split_n(split, ipp, items, nbb, B, BLOCK_B: tl.constexpr):
    start, end = _items_of(split, ipp, items)
    return _count(start, end, nbb, B, BLOCK_B).to(tl.float32)


@triton.jit
def _split_mean(pshift_ptr, poff_ptr, split, C, offs, mask, shift):
    """Program ``split``'s mean minus ``shift`` (shifts are close: their difference is exact, or nearly)."""
    own = tl.load(pshift_ptr + split * C + offs, mask=mask, other=0.0)
    return (own - shift) + tl.load(poff_ptr + split * C + offs, mask=mask, other=0.0)


@triton.jit
def _stats_finalize_kernel(
    pshift_ptr, poff_ptr, pm2_ptr, mean_ptr, var_ptr, rmean_ptr, rvar_ptr,
    C, B, nbb, items, ipp, splits, n_total, momentum,
    BLOCK_B: tl.constexpr, BLOCK: tl.constexpr,
):
    """Merge the per-program statistics in order (parallel-variance formula, every mean relative to the first
    program's shift): mean, biased var -> [C]; running stats updated in place."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    n = n_total.to(tl.float32)
    shift = tl.load(pshift_ptr + offs, mask=mask, other=0.0)
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(splits):
        n_s = _split_n(s, ipp, items, nbb, B, BLOCK_B)
        acc += n_s * _split_mean(pshift_ptr, poff_ptr, s, C, offs, mask, shift)
    mean_rel = acc / n
    m2 = tl.zeros([BLOCK], tl.float32)
    for s in range(splits):
        d = _split_mean(pshift_ptr, poff_ptr, s, C, offs, mask, shift) - mean_rel
        n_s = _split_n(s, ipp, items, nbb, B, BLOCK_B)
        m2 += tl.load(pm2_ptr + s * C + offs, mask=mask, other=0.0) + n_s * d * d
    mean = shift + mean_rel
    tl.store(mean_ptr + offs, mean, mask=mask)
    tl.store(var_ptr + offs, m2 / n, mask=mask)
    if rmean_ptr is not None:
        # nn.BatchNorm2d: running = (1 - momentum) * running + momentum * stat, unbiased variance.
        rmean = tl.load(rmean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rvar = tl.load(rvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rmean = momentum * mean + (1.0 - momentum) * rmean
        rvar = momentum * (m2 / (n - 1.0)) + (1.0 - momentum) * rvar
        tl.store(rmean_ptr + offs, _cast_for(rmean_ptr, rmean), mask=mask)
        tl.store(rvar_ptr + offs, _cast_for(rvar_ptr, rvar), mask=mask)


@triton.jit
def _apply_kernel(
    x_ptr, res_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr,
    C, B, nbb, items, ipp, eps,
    sxa, sxc, sxb, sra, src, srb, sya, syc, syb,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr,
):
    """``y = mish((x - mean) * rstd * w + b) (+ residual)``, ``rstd = 1 / sqrt(var + eps)``, over tiles
    [start, end) of this program."""
    pid_c = tl.program_id(1)
    start, end = _items_of(tl.program_id(0), ipp, items)
    mean = _channel(mean_ptr, pid_c, C, BLOCK_C, 0.0)
    scale = _channel_rstd(var_ptr, pid_c, C, eps, BLOCK_C) * _channel(w_ptr, pid_c, C, BLOCK_C, 1.0)
    shift = _channel(b_ptr, pid_c, C, BLOCK_C, 0.0)
    for item in range(start, end):
        a, c, b, mask = _tile(item, nbb, C, B, pid_c, BLOCK_C, BLOCK_B, IDX64)
        # (x - mean) first: x * scale + (b - mean * scale) would cancel for large means.
        y = mish((_load(x_ptr, a, c, b, sxa, sxc, sxb, mask) - mean) * scale + shift)
        if res_ptr is not None:
            y += _load(res_ptr, a, c, b, sra, src, srb, mask)
        _store(y_ptr, a, c, b, sya, syc, syb, mask, y)


@triton.jit
def _backward_kernel(
    dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, sum_g_ptr, sum_gx_ptr, pg_ptr, pgx_ptr,
    C, B, nbb, items, ipp, eps, inv_n,
    sda, sdc, sdb, sxa, sxc, sxb, sea, sec, seb,
    REDUCE: tl.constexpr, WRITE_DX: tl.constexpr, TRAINING: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr,
):
    """With ``g = dy * mish'(v)``, ``v = x_hat * w + b``, ``x_hat = (x - mean) * rstd``:

    - REDUCE: per-program sums of ``g`` and ``g * x_hat`` -> partials [splits, C];
    - WRITE_DX: ``dx = w * rstd * (g - mean(g) - x_hat * mean(g * x_hat))`` (TRAINING, from the finished sums
      ``sum_g`` and ``sum_gx``) or ``dx = w * rstd * g`` (eval). dx has strides (sea, sec, seb).
    """
    split = tl.program_id(0)
    pid_c = tl.program_id(1)
    start, end = _items_of(split, ipp, items)
    mean = _channel(mean_ptr, pid_c, C, BLOCK_C, 0.0)
    rstd = _channel_rstd(var_ptr, pid_c, C, eps, BLOCK_C)
    w = _channel(w_ptr, pid_c, C, BLOCK_C, 1.0)
    bias = _channel(b_ptr, pid_c, C, BLOCK_C, 0.0)
    if TRAINING:
        mean_g = _channel(sum_g_ptr, pid_c, C, BLOCK_C, 0.0) * inv_n
        mean_gx = _channel(sum_gx_ptr, pid_c, C, BLOCK_C, 0.0) * inv_n
    acc_g = tl.zeros([BLOCK_C, BLOCK_B], tl.float32)
    acc_gx = tl.zeros([BLOCK_C, BLOCK_B], tl.float32)
    for item in range(start, end):
        a, c, b, mask = _tile(item, nbb, C, B, pid_c, BLOCK_C, BLOCK_B, IDX64)
        x_hat = (_load(x_ptr, a, c, b, sxa, sxc, sxb, mask) - mean) * rstd
        # Masked lanes load dy = 0, so g = 0 there.
        g = _load(dy_ptr, a, c, b, sda, sdc, sdb, mask) * mish_grad(x_hat * w + bias)
        if REDUCE:
            acc_g += g
            acc_gx += g * x_hat
        if WRITE_DX:
            if TRAINING:
                g = g - mean_g - x_hat * mean_gx
            _store(dx_ptr, a, c, b, sea, sec, seb, mask, g * (w * rstd))
    if REDUCE:
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        tl.store(pg_ptr + split * C + offs_c, tl.sum(acc_g, axis=1), mask=mask_c)
        tl.store(pgx_ptr + split * C + offs_c, tl.sum(acc_gx, axis=1), mask=mask_c)


@triton.jit
def _sum_partials_kernel(pg_ptr, pgx_ptr, sum_g_ptr, sum_gx_ptr, C, splits, BLOCK: tl.constexpr):
    """Column sums of the partials [splits, C], in order (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    acc_g = tl.zeros([BLOCK], tl.float32)
    acc_gx = tl.zeros([BLOCK], tl.float32)
    for s in range(splits):
        acc_g += tl.load(pg_ptr + s * C + offs, mask=mask, other=0.0)
        acc_gx += tl.load(pgx_ptr + s * C + offs, mask=mask, other=0.0)
    tl.store(sum_g_ptr + offs, acc_g, mask=mask)
    tl.store(sum_gx_ptr + offs, acc_gx, mask=mask)


# --- launch helpers ------------------------------------------------------------------------------------------

def _merged_stride(dims: Sequence[tuple[int, int]]) -> int | None:
    """Stride of the single axis that ``dims`` ((size, stride), outer to inner) flatten into, or None."""
    stride = expected = None
    for size, st in reversed(dims):
        if size == 1:
            continue
        if stride is None:
            stride = st
        elif st != expected:
            return None
        expected = st * size
    return 1 if stride is None else stride


def view_strides(t: torch.Tensor, merge_n: bool) -> tuple[int, int, int] | None:
    """``(s_a, s_c, s_b)`` of ``t`` [N, C, H, W] as [A, C, B] (A = 1 when ``merge_n``, else N), or None."""
    n, _, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    s_b = _merged_stride([(n, sn), (h, sh), (w, sw)] if merge_n else [(h, sh), (w, sw)])
    if s_b is None:
        return None
    return (0 if merge_n else sn), sc, s_b


@dataclass(frozen=True)
class Plan:
    """How one call walks its tensors: the [A, C, B] view, the tile, and the tiles per channel block."""

    merge_n: bool
    c: int
    b: int
    block_c: int
    block_b: int
    nbb: int  # tiles along B per index of A
    items: int  # tiles per channel block: A * nbb
    idx64: bool

    @property
    def c_blocks(self) -> int:
        return cdiv(self.c, self.block_c)

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        strides = view_strides(t, self.merge_n)
        assert strides is not None, "tensor does not fit the plan"
        return strides

    def splits(self, device: torch.device) -> tuple[int, int]:
        """(programs, tiles per program) along the tiles of a channel block, for a reduction."""
        # At most the target in all (rounding up would start a second, mostly idle wave of programs).
        splits = max(1, min(self.items, target_programs(device) // self.c_blocks))
        ipp = cdiv(self.items, splits)
        return cdiv(self.items, ipp), ipp


def make_plan(x: torch.Tensor, others: Sequence[torch.Tensor | None] = ()) -> Plan | None:
    """A plan in which ``x`` and every tensor of ``others`` (None skipped) fit, or None. Cached on shapes
    and strides: for small tensors the host-side cost of a call is what a user waits for."""
    layouts = tuple((tuple(t.shape), t.stride()) for t in (x, *others) if t is not None)
    return _cached_plan(layouts, INT32_LIMIT)


@functools.lru_cache(maxsize=4096)
def _cached_plan(layouts: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...], int32_limit: int) -> Plan | None:
    """:func:`make_plan` of tensors given as (shape, strides), ``x`` first."""
    tensors = [torch.empty_strided(shape, stride, device="meta") for shape, stride in layouts]
    for merge_n in (True, False):
        if all(view_strides(t, merge_n) is not None for t in tensors):
            return _plan(tensors[0], merge_n, tensors, int32_limit)
    return None


def _plan(x: torch.Tensor, merge_n: bool, tensors: Sequence[torch.Tensor], int32_limit: int) -> Plan:
    n, c, h, w = x.shape
    a, b = (1, n * h * w) if merge_n else (n, h * w)
    if view_strides(x, merge_n)[1] == 1 and c > 1:  # channels innermost
        block_c = min(next_power_of_2(c), BLOCK_C_CONTIGUOUS)
        block_b = min(next_power_of_2(b), TILE // block_c)
    else:
        block_b = min(next_power_of_2(b), TILE)
        block_c = min(next_power_of_2(c), TILE // block_b)
    nbb = cdiv(b, block_b)
    # The largest offset any lane computes, masked lanes of the padded tile included (int32 arithmetic must
    # hold it, each term too).
    padded = (a, cdiv(c, block_c) * block_c, nbb * block_b)
    reach = max(sum((extent - 1) * abs(stride) for extent, stride in zip(padded, view_strides(t, merge_n),
                                                                          strict=True))
                for t in tensors)
    return Plan(merge_n, c, b, block_c, block_b, nbb, a * nbb, reach > int32_limit)


def _max_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


def target_programs(device: torch.device) -> int:
    """Programs a reduction aims for in all: PROGRAMS_PER_SM per SM (a few in the interpreter)."""
    return INTERPRETER_PROGRAMS if INTERPRETED else PROGRAMS_PER_SM * _sm_count(device)


@functools.cache
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _sm_count_cached(device.index if device.index is not None else torch.cuda.current_device())


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _vectors(*vectors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The [C] vectors as the kernels read them: contiguous (a no-op for parameters and buffers)."""
    return [None if t is None else t.contiguous() for t in vectors]


def new_fp32(*shape: int, device: torch.device) -> torch.Tensor:
    """An uninitialized fp32 buffer (every element is written before it is read; tests poison these)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The dense layout closest to ``x``'s: channels_last when its channels are innermost."""
    return torch.channels_last if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format


def _prepare(x: torch.Tensor, inputs: Sequence[torch.Tensor | None], output: torch.Tensor | None
             ) -> tuple[Plan, torch.Tensor, list[torch.Tensor | None], torch.Tensor | None]:
    """A plan for ``x``, ``inputs`` and ``output``. Tensors that fit no common plan are replaced: inputs by
    copies laid out like ``x``, ``output`` (also when it overlaps an input other than exactly) by a new
    tensor, which the caller then copies into the original."""
    dense = _memory_format(x)
    if make_plan(x) is None:
        x = x.contiguous(memory_format=dense)
    inputs = list(inputs)
    if make_plan(x, inputs) is None:
        inputs = [None if t is None else t.contiguous(memory_format=dense) for t in inputs]
    if output is not None and (_overlaps_inexactly(output, [x, *inputs])
                               or make_plan(x, [*inputs, output]) is None):
        output = torch.empty_like(x, memory_format=dense)  # fully written, then copied into the original
    plan = make_plan(x, [*inputs, output])
    if plan is None:  # only x's own odd strides are left to blame
        x = x.contiguous(memory_format=dense)
        plan = make_plan(x, [*inputs, output])
    assert plan is not None
    return plan, x, inputs, output


def _overlaps_inexactly(out: torch.Tensor, tensors: Sequence[torch.Tensor | None]) -> bool:
    """True when an element of ``out`` may share memory with an element of one of ``tensors`` at another
    index. The very same view is safe (every element is read, then written, by one program), and so are
    disjoint views of one buffer, such as two channel slices."""
    return any(t is not None and _may_alias_elsewhere(out, t) for t in tensors)


def _may_alias_elsewhere(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    delta = abs(a.storage_offset() - b.storage_offset())
    if a.shape == b.shape and a.stride() == b.stride():
        if delta == 0:
            return False
        dims = sorted(((st, size) for size, st in zip(a.shape, a.stride(), strict=True) if size > 1),
                      reverse=True)
        # With each stride beyond everything the smaller ones reach, offsets decompose uniquely (greedily):
        # the views overlap iff the offset difference is an index difference.
        reach = 0
        for st, size in reversed(dims):
            if st <= reach:
                return True  # overlapping strides: give up, assume the worst
            reach += st * (size - 1)
        for st, size in dims:
            delta -= min(delta // st, size - 1) * st
        return delta == 0
    lo_a, lo_b = a.storage_offset(), b.storage_offset()
    return lo_a <= lo_b + _max_offset(b) and lo_b <= lo_a + _max_offset(a)


def batch_stats(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of ``x`` [N, C, H, W] (N*H*W >= 2), fp32 [C] each.

    ``running_mean`` / ``running_var`` ([C], any float dtype, or None) are updated in place as
    ``nn.BatchNorm2d`` does: ``running = (1 - momentum) * running + momentum * stat``, unbiased variance.
    """
    if any(t is not None and not t.is_contiguous() for t in (running_mean, running_var)):
        # The kernel updates the statistics in place, through contiguous pointers.
        rm, rv = (t.contiguous() for t in (running_mean, running_var))
        mean, var = batch_stats(x, rm, rv, momentum)
        running_mean.copy_(rm)
        running_var.copy_(rv)
        return mean, var
    plan, x, _, _ = _prepare(x, [], None)
    c = plan.c
    splits, ipp = plan.splits(x.device)
    pshift, poff, pm2 = (new_fp32(splits, c, device=x.device) for _ in range(3))
    mean, var = new_fp32(c, device=x.device), new_fp32(c, device=x.device)
    with _on(x.device):
        _stats_kernel[(splits, plan.c_blocks)](
            x, pshift, poff, pm2, c, plan.b, plan.nbb, plan.items, ipp, *plan.strides(x),
            BLOCK_C=plan.block_c, BLOCK_B=plan.block_b, IDX64=plan.idx64, num_warps=NUM_WARPS,
        )
        _stats_finalize_kernel[(cdiv(c, FINALIZE_BLOCK),)](
            pshift, poff, pm2, mean, var, running_mean, running_var,
            c, plan.b, plan.nbb, plan.items, ipp, splits, x.numel() // c, float(momentum),
            BLOCK_B=plan.block_b, BLOCK=FINALIZE_BLOCK,
        )
    return mean, var


def apply(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float, weight: torch.Tensor | None,
          bias: torch.Tensor | None, residual: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = mish((x - mean) / sqrt(var + eps) * weight + bias) (+ residual)``.

    Args:
        x, residual, out: [N, C, H, W], any strides (``out`` e.g. a channel slice of a larger buffer; it may
            also be ``x`` itself). mean, var, weight, bias: [C], any float dtype (weight, bias may be None).
    """
    plan, x_in, (res,), y = _prepare(x, [residual], out)
    mean, var, weight, bias = _vectors(mean, var, weight, bias)
    with _on(x.device):
        _apply_kernel[(plan.items, plan.c_blocks)](
            x_in, res, y, mean, var, weight, bias, plan.c, plan.b, plan.nbb, plan.items, 1, float(eps),
            *plan.strides(x_in), *(plan.strides(res) if res is not None else (0, 0, 0)), *plan.strides(y),
            BLOCK_C=plan.block_c, BLOCK_B=plan.block_b, IDX64=plan.idx64, num_warps=NUM_WARPS,
        )
    if y is not out:
        out.copy_(y)


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    dx: torch.Tensor | None,
    need_sums: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Gradients of :func:`apply` (without the residual) given ``dy`` [N, C, H, W].

    ``training``: mean and var are x's batch statistics, and dx includes the gradient through them.
    Writes dx into ``dx`` (when given) and returns ``(sum_g, sum_gx)`` fp32 [C] -- the bias and weight
    gradients -- when ``need_sums`` or ``training`` (dx needs them then), else None.
    """
    plan, x_in, (dy_in,), dx_out = _prepare(x, [dy], dx)
    mean, var, weight, bias = _vectors(mean, var, weight, bias)
    args = (mean, var, eps, weight, bias)
    sums = None
    with _on(x.device):
        if training or need_sums:
            # In eval, dx does not depend on the sums: it is written in the same pass.
            sums = _reduce_backward(plan, dy_in, x_in, None if training else dx_out, args)
        if dx_out is not None and (training or not need_sums):
            _launch_backward(plan, dy_in, x_in, dx_out, args, sums if training else None, None, plan.items, 1)
    if dx is not None and dx_out is not dx:
        dx.copy_(dx_out)
    return sums


def _reduce_backward(plan: Plan, dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor | None,
                     args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel sums of g and g * x_hat in fp32 [C] (and eval's dx in the same pass when given)."""
    c = plan.c
    splits, ipp = plan.splits(x.device)
    partials = new_fp32(2, splits, c, device=x.device)
    _launch_backward(plan, dy, x, dx, args, None, partials, splits, ipp)
    sum_g, sum_gx = new_fp32(c, device=x.device), new_fp32(c, device=x.device)
    _sum_partials_kernel[(cdiv(c, FINALIZE_BLOCK),)](
        partials[0], partials[1], sum_g, sum_gx, c, splits, BLOCK=FINALIZE_BLOCK,
    )
    return sum_g, sum_gx


def _launch_backward(plan: Plan, dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor | None, args: tuple,
                     sums: tuple[torch.Tensor, torch.Tensor] | None, partials: torch.Tensor | None,
                     programs: int, ipp: int) -> None:
    """One ``_backward_kernel`` launch: reduces when ``partials`` is given, writes ``dx`` when given (the
    training formula when ``sums`` is given)."""
    mean, var, eps, weight, bias = args
    sum_g, sum_gx = sums if sums is not None else (None, None)
    pg, pgx = (partials[0], partials[1]) if partials is not None else (None, None)
    _backward_kernel[(programs, plan.c_blocks)](
        dy, x, dx, mean, var, weight, bias, sum_g, sum_gx, pg, pgx,
        plan.c, plan.b, plan.nbb, plan.items, ipp, float(eps), 1.0 / (x.numel() // plan.c),
        *plan.strides(dy), *plan.strides(x), *(plan.strides(dx) if dx is not None else (0, 0, 0)),
        REDUCE=partials is not None, WRITE_DX=dx is not None, TRAINING=sums is not None,
        BLOCK_C=plan.block_c, BLOCK_B=plan.block_b, IDX64=plan.idx64, num_warps=NUM_WARPS,
    )
