"""Fused BatchNorm + Mish (+ residual) in Triton: device code and launch helpers.

Every [N, C, H, W] tensor of one call is walked as a 3-D view ``[A, C, B]`` with element strides
``(s_a, s_c, s_b)``: either ``A = 1, B = N*H*W`` (N, H and W merge, e.g. channels_last or C == 1) or
``A = N, B = H*W`` (H and W merge, e.g. NCHW). A tile is ``[BLOCK_C, BLOCK_B]``; Triton coalesces along
whichever of the two axes has unit stride (the compiler specializes a stride equal to 1), so loads are
vectorized in both layouts. Channel slices of a larger buffer (``out=``) keep the same view, only with a
larger stride.

Passes over memory (x: the input, y: the output, dy / dx: their gradients):

- training forward: a reduction pass reads x for per-program partial statistics; the last program of each
  channel block to finish (an integer count) merges the block's partials, in a fixed order, into the mean and
  biased variance (no floating-point atomics: deterministic); an elementwise pass then reads x (+ residual)
  and writes y. The running statistics are updated by the merging programs (or by ``_running_kernel``, from
  the mean and variance, where the training forward runs as an op of its own, without them).
- eval forward: ``_apply_kernel`` only, from the running statistics.
- training backward: a reduction pass reads x and dy for per-program partial sums of ``g = dy * mish'(v)``
  and ``g * x_hat`` (the last program of each channel block adds them up, in order), then an elementwise pass
  reads x and dy again and writes dx.
- eval backward: one ``_backward_kernel`` pass writes dx and the partial sums for the weight and bias grads
  (the last program of each channel block adds them up, as in the training passes).

The two training passes run **channel group by channel group, pipelined** (``_train_forward_kernel``,
``_train_backward_kernel``): launch ``j`` runs the reduction of group ``j`` and the elementwise pass of group
``j - 1`` side by side, in one grid. A group's channels are sized (:func:`group_budget`) so that what the
elementwise pass reads again is still in the L2 cache from the launch before: DRAM then sees x once (plus
dy once in backward), not twice, on tensors larger than the L2. Small tensors are one group: two launches.
By default every tensor is one group (``L2_SHARE = 0``): at the benchmark shape one group was faster on an
H200; ``CSPMIRROR_BN_GROUP_BYTES`` turns the grouping on.
The elementwise pass retraces its reduction backwards (``SECOND_PASS_REVERSED``): its programs start first in
their launch, in the reverse order of the reduction's, each walking the same tiles from the last, so that it
re-reads first what the L2 most likely still holds; this matters where a group cannot fit the L2 (one channel
block, e.g. channels_last with C <= 64). ``L2_HINTS`` adds eviction priorities (on in the backward, as measured).

Mean and variance are fp32 [C]. The training forward's elementwise pass and the eval ``_apply_kernel`` run the
same :func:`_apply_tiles` on them, so a forward recomputed from the saved mean and var is bit-identical to the
training forward. Everything is computed in fp32.

Statistics stay accurate for large means (|mean| >> std): each reduction program subtracts a shift (its first
tile's mean) before summing, and reports the shift, its mean minus the shift and its M2 separately; the
merge combines the programs with the parallel-variance formula around one shift. (A mean of 1e4 with std 1e-2
keeps a variance accurate to ~1e-7, where fp32 sums of x and x^2 are off by 1e5 times.)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cspmirror.backends import triton_interpreted

from .activations import mish, mish_grad
from .launch import cdiv, next_power_of_2, on_device

INTERPRETED = triton_interpreted()
INTERPRETED_BF16_FIX = tl.constexpr(INTERPRETED)
# Elements per tile, warps per program. The interpreter runs one program at a time on numpy arrays.
TILE = 4096
NUM_WARPS = 8
# Channels per tile when C is the contiguous axis (64 bf16 = one 128-byte line).
BLOCK_C_CONTIGUOUS = 64
# Programs to aim for per SM (GPU) or in all (interpreter), per pass of a launch.
PROGRAMS_PER_SM = 8
INTERPRETER_PROGRAMS = 4
VECTOR_BLOCK = 256  # channels per program of the running statistics' kernel
# Offsets beyond this need int64 index arithmetic.
INT32_LIMIT = 2**31 - 1
# Channel groups of the pipelined training passes: the bytes a group's second pass reads again, at most
# L2 / L2_SHARE (a group's first pass, the next group's first pass and the writes share the L2 meanwhile).
# CSPMIRROR_BN_GROUP_BYTES overrides it (0: one group), e.g. to sweep it in a benchmark. L2_SHARE = 0: one
# group unless asked for. Measured on an H200 (python -m bench.bn_groups, 32x256x64x64 bf16, about the L2's
# size): one group (two launches) beat every budget from L2/8 to L2/2, both layouts, both passes.
L2_SHARE = 0
GROUP_BYTES_ENV = "CSPMIRROR_BN_GROUP_BYTES"
# The second (elementwise) pass of a pipelined training pass retraces its reduction backwards (programs and
# each program's tiles), starting with what was read last: what the L2 most likely still holds, also when one
# group is the whole tensor.
SECOND_PASS_REVERSED = True
# L2 eviction priorities per training pass: the reduction reads with evict_last (kept for the re-read), the
# second pass with evict_first (its last use). Measured on an H200 (python -m bench.bn_groups, two runs, one
# group, 32x256x64x64 bf16): the backward 28-32% faster in channels_last and about even in NCHW with them; the
# forward 4-5% slower in both layouts.
L2_HINTS = {"forward": False, "backward": True}
# Partials per step of the merges at the end of a reduction (see _merge_stats).
MERGE_ROWS = 64


# --- device code ---------------------------------------------------------------------------------------------

@triton.jit
def _tile(item, nbb, C, B, pid_c, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr):
    """Indices of tile ``item`` (``a * nbb + b_block``) of channel block ``pid_c``: (a, offs_c, offs_b, mask).
    IDX64: in int64 from the tile number on (``b_block * BLOCK_B`` passes 2^31 where B does, e.g. C = 1)."""
    if IDX64:
        item = tl.cast(item, tl.int64)
    a = item // nbb
    offs_b = (item - a * nbb) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_c < C)[:, None] & (offs_b < B)[None, :]
    if IDX64:
        offs_c = offs_c.to(tl.int64)
    return a, offs_c[:, None], offs_b[None, :], mask


@triton.jit
def _load(ptr, a, c, b, sa, sc, sb, mask, EVICT: tl.constexpr):
    # Cast at once: the interpreter holds bf16 as raw 16-bit integers.
    return tl.load(ptr + a * sa + c * sc + b * sb, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)


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
    """The tiles ``[start, end)`` of program ``split`` of its channel block."""
    start = split * ipp
    return start, tl.minimum(start + ipp, items)


@triton.jit
def _nth_item(i, start, end, REVERSED: tl.constexpr):
    """The tile visited at step ``i`` (``start <= i < end``) of a walk over [start, end), forwards or back."""
    item = i
    if REVERSED:
        item = start + end - 1 - i
    return item


@triton.jit
def _count(start, end, nbb, B, BLOCK_B: tl.constexpr):
    """Valid elements per channel in tiles [start, end): every tile is full except the last of each ``a``, which
    lacks ``nbb * BLOCK_B - B`` (computed without that product, which passes 2^31 where B does)."""
    lasts = end // nbb - start // nbb
    return (end - start) * BLOCK_B - lasts * ((BLOCK_B - B % BLOCK_B) % BLOCK_B)


@triton.jit
def _role(pid, first_block, splits):
    """(split, channel block) of program ``pid`` of a pass, counted from the pass's first program: the
    ``splits`` programs of one channel block are adjacent."""
    block = pid // splits
    return pid - block * splits, first_block + block


@triton.jit
def _launch_role(reduce_programs, REVERSED: tl.constexpr):
    """(whether this program reduces, its index within its pass) in a pipelined launch. In order: the
    reduction's programs come first. REVERSED: the elementwise pass's come first, numbered from the last, so
    that the second pass retraces its reduction backwards (programs start in about pid order: the first
    elementwise programs re-read what the last reduction programs read, the data the L2 most likely holds,
    before this launch's reduction brings in the next group)."""
    pid = tl.program_id(0)
    elementwise_programs = tl.num_programs(0) - reduce_programs
    if REVERSED:
        reducing = pid >= elementwise_programs
        index = tl.where(reducing, pid - elementwise_programs, elementwise_programs - 1 - pid)
    else:
        reducing = pid < reduce_programs
        index = tl.where(reducing, pid, pid - reduce_programs)
    return reducing, index


@triton.jit
def _channel_offsets(pid_c, C, BLOCK_C: tl.constexpr):
    offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return offs, offs < C


@triton.jit
def _channel(ptr, pid_c, C, BLOCK_C: tl.constexpr, default):
    """Per-channel fp32 vector [BLOCK_C, 1] of ``ptr`` (``default`` where ``ptr`` is absent)."""
    offs, mask = _channel_offsets(pid_c, C, BLOCK_C)
    if ptr is None:
        value = tl.full([BLOCK_C], default, tl.float32)
    else:
        value = tl.load(ptr + offs, mask=mask, other=default).to(tl.float32)
    return value[:, None]


@triton.jit
def _rstd(var, eps):
    """``1 / sqrt(var + eps)``, correctly rounded (as PyTorch's): every kernel computes it alike, from the
    same fp32 var. (The GPU's approximate square root and division would put one error on a whole channel.)"""
    return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _last_to_finish(count_ptr, pid_c, splits):
    """Whether this program is the last of channel block ``pid_c``'s ``splits`` programs to get here (an
    integer count, so whoever it is, what it then computes is the same: deterministic). The barrier orders
    all of this program's stores before its count; acq_rel makes every store counted before visible to the
    last one. The last one sets the count back to 0 (every other program has counted by then), so the
    counters are zero again for the next launch without a fill (see :func:`zeroed_counters`)."""
    tl.debug_barrier()
    last = tl.atomic_add(count_ptr + pid_c, 1, sem="acq_rel") == splits - 1
    tl.store(count_ptr + pid_c, 0, mask=last)
    return last


@triton.jit
def _load_partial(ptrs, mask):
    """Partials stored by other programs of the same launch: read from L2 (``.cg``), never from a stale L1
    line (a line may hold the neighbouring channel block's partials, read before these were written)."""
    return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")


# --- training forward: statistics --------------------------------------------------------------------------

@triton.jit
def _stats_tiles(
    x_ptr, pshift_ptr, poff_ptr, pm2_ptr, split, pid_c, C, B, nbb, items, ipp, sxa, sxc, sxb,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr, EVICT: tl.constexpr,
):
    """Over program ``split``'s tiles of channel block ``pid_c``, per channel: the shift (its first tile's
    mean), the mean minus the shift, and M2 (the sum of squared deviations from the mean) -> row ``split`` of
    the [splits, C] partials. Keeping the mean as shift + offset keeps its low bits, which the merge of large
    means needs."""
    start, end = _items_of(split, ipp, items)
    # Shift by the first tile's mean so that the fp32 sums below do not cancel for large means.
    a, c, b, mask = _tile(start, nbb, C, B, pid_c, BLOCK_C, BLOCK_B, IDX64)
    first = _load(x_ptr, a, c, b, sxa, sxc, sxb, mask, EVICT)
    shift = tl.sum(first, axis=1) / _count(start, start + 1, nbb, B, BLOCK_B).to(tl.float32)
    # No shift where that mean is inf or NaN: x - shift would be NaN everywhere, where the mean of a channel
    # holding +-inf is +-inf (as the reference's); the sums below then carry the inf or NaN themselves.
    shift = tl.where(shift - shift == 0.0, shift, 0.0)  # (x - x is NaN at +-inf and NaN, else 0)
    acc1 = tl.where(mask, first - shift[:, None], 0.0)
    acc2 = acc1 * acc1
    for item in range(start + 1, end):
        a, c, b, mask = _tile(item, nbb, C, B, pid_c, BLOCK_C, BLOCK_B, IDX64)
        d = tl.where(mask, _load(x_ptr, a, c, b, sxa, sxc, sxb, mask, EVICT) - shift[:, None], 0.0)
        acc1 += d
        acc2 += d * d
    n = _count(start, end, nbb, B, BLOCK_B).to(tl.float32)
    s1 = tl.sum(acc1, axis=1)
    s2 = tl.sum(acc2, axis=1)
    offs_c, mask_c = _channel_offsets(pid_c, C, BLOCK_C)
    tl.store(pshift_ptr + split * C + offs_c, shift, mask=mask_c)
    tl.store(poff_ptr + split * C + offs_c, s1 / n, mask=mask_c)
    tl.store(pm2_ptr + split * C + offs_c, tl.maximum(s2 - s1 * (s1 / n), 0.0, propagate_nan=tl.PropagateNan.ALL),
             mask=mask_c)


@triton.jit
def _partial_rows(first, splits, ipp, items, nbb, B, BLOCK_B: tl.constexpr, ROWS: tl.constexpr):
    """Rows ``[first, first + ROWS)`` of the [splits, C] partials, as a [1, ROWS] tile: their indices,
    whether each is a program's (``< splits``), and its valid elements per channel (0 if not)."""
    rows = first + tl.arange(0, ROWS)
    start, end = _items_of(rows, ipp, items)
    valid = rows < splits
    n = tl.where(valid, _count(start, end, nbb, B, BLOCK_B).to(tl.float32), 0.0)
    return rows[None, :], valid[None, :], n[None, :]


@triton.jit
def _split_mean(pshift_ptr, poff_ptr, rows, C, offs, mask, shift):
    """Programs ``rows``' means minus ``shift`` (shifts are close: their difference is exact, or nearly)."""
    own = _load_partial(pshift_ptr + rows * C + offs, mask)
    return (own - shift) + _load_partial(poff_ptr + rows * C + offs, mask)


@triton.jit
def _merge_stats(pshift_ptr, poff_ptr, pm2_ptr, offs, mask, C, B, nbb, items, ipp, splits, n_total,
                 BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, ROWS: tl.constexpr):
    """Mean and biased variance of channels ``offs`` [BLOCK_C] from their ``splits`` partials
    (parallel-variance formula, every mean relative to the first program's shift), ROWS partials at a
    time as [BLOCK_C, ROWS] tiles, in a fixed order (deterministic). One partial at a time, the merging
    program waited out one L2 round trip per partial: with hundreds of programs per channel block
    (channels_last), that wait was most of the pass (seen on an H200). The tiles add up elementwise and are
    reduced once, after the loop (see :func:`_column_sums`)."""
    n = n_total.to(tl.float32)
    shift = _load_partial(pshift_ptr + offs, mask)
    offs, mask = offs[:, None], mask[:, None]
    acc = tl.zeros([BLOCK_C, ROWS], tl.float32)
    for first in range(0, splits, ROWS):
        rows, valid, n_s = _partial_rows(first, splits, ipp, items, nbb, B, BLOCK_B, ROWS)
        acc += n_s * _split_mean(pshift_ptr, poff_ptr, rows, C, offs, mask & valid, shift[:, None])
    mean_rel = tl.sum(acc, axis=1) / n
    m2 = tl.zeros([BLOCK_C, ROWS], tl.float32)
    for first in range(0, splits, ROWS):
        rows, valid, n_s = _partial_rows(first, splits, ipp, items, nbb, B, BLOCK_B, ROWS)
        d = _split_mean(pshift_ptr, poff_ptr, rows, C, offs, mask & valid, shift[:, None]) - mean_rel[:, None]
        own = _load_partial(pm2_ptr + rows * C + offs, mask & valid)
        m2 += tl.where(valid, own + n_s * d * d, 0.0)
    return shift + mean_rel, tl.sum(m2, axis=1) / n


# --- normalize + Mish --------------------------------------------------------------------------------------

@triton.jit
def _apply_tiles(
    x_ptr, res_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pid_c, start, end, C, B, nbb, eps,
    sxa, sxc, sxb, sra, src, srb, sya, syc, syb,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr,
    REVERSED: tl.constexpr, EVICT: tl.constexpr,
):
    """``y = mish((x - mean) * rstd * w + b) (+ residual)`` over tiles [start, end) of channel block
    ``pid_c`` (walked backwards when REVERSED; EVICT: the L2 eviction policy of the loads)."""
    mean = _channel(mean_ptr, pid_c, C, BLOCK_C, 0.0)
    scale = _rstd(_channel(var_ptr, pid_c, C, BLOCK_C, 1.0), eps) * _channel(w_ptr, pid_c, C, BLOCK_C, 1.0)
    shift = _channel(b_ptr, pid_c, C, BLOCK_C, 0.0)
    for i in range(start, end):
        a, c, b, mask = _tile(_nth_item(i, start, end, REVERSED), nbb, C, B, pid_c, BLOCK_C, BLOCK_B, IDX64)
        # (x - mean) first: x * scale + (b - mean * scale) would cancel for large means.
        y = mish((_load(x_ptr, a, c, b, sxa, sxc, sxb, mask, EVICT) - mean) * scale + shift,
                 y_ptr.dtype.element_ty)
        if res_ptr is not None:
            y += _load(res_ptr, a, c, b, sra, src, srb, mask, EVICT)
        _store(y_ptr, a, c, b, sya, syc, syb, mask, y)


@triton.jit
def _apply_kernel(
    x_ptr, res_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, C, B, nbb, items, eps,
    sxa, sxc, sxb, sra, src, srb, sya, syc, syb,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr, EVICT: tl.constexpr,
):
    """Eval forward: :func:`_apply_tiles` from given statistics, one tile per program (a 1-D grid of
    ``items`` programs per channel block, see :func:`_role`). EVICT (``""``: none) comes from the launch:
    Triton 3.6 takes no string written in device code as a constexpr argument."""
    item, pid_c = _role(tl.program_id(0), 0, items)
    _apply_tiles(x_ptr, res_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pid_c, item, item + 1, C, B, nbb, eps,
                 sxa, sxc, sxb, sra, src, srb, sya, syc, syb, BLOCK_C, BLOCK_B, IDX64, False, EVICT)


# The passes' scalars change from launch to launch of a pipeline: specializing on them (== 1, % 16) would
# compile the kernels again for many launches of one call, for no gain (they never align a vector access).
PASS_ARGS = ("reduce_block", "reduce_splits", "reduce_ipp", "reduce_programs",
             "elementwise_block", "elementwise_splits", "elementwise_ipp")


@triton.jit(do_not_specialize=PASS_ARGS)
def _train_forward_kernel(
    x_ptr, res_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pshift_ptr, poff_ptr, pm2_ptr, count_ptr,
    rmean_ptr, rvar_ptr, C, B, nbb, items, eps, n_total, momentum,
    reduce_block, reduce_splits, reduce_ipp, reduce_programs, elementwise_block, elementwise_splits, elementwise_ipp,
    sxa, sxc, sxb, sra, src, srb, sya, syc, syb,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr,
    REVERSED: tl.constexpr, KEEP: tl.constexpr, STREAM: tl.constexpr, MERGE_ROWS: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
):
    """One launch of the pipelined training forward: ``reduce_programs`` programs reduce one channel group
    (:func:`_stats_tiles`; the last program of each channel block merges its partials into the mean and
    var, and with UPDATE_RUNNING updates the block's running statistics from them), the others normalize
    the group reduced by the launch before (:func:`_apply_tiles`), over the same tiles per program as its
    reduction (which programs take which role, and REVERSED, which retraces the reduction's schedule and
    tiles backwards: :func:`_launch_role`). KEEP, STREAM: the eviction policies of the first and the second
    pass (see :func:`pass_options`)."""
    reducing, index = _launch_role(reduce_programs, REVERSED)
    if reducing:
        split, pid_c = _role(index, reduce_block, reduce_splits)
        _stats_tiles(x_ptr, pshift_ptr, poff_ptr, pm2_ptr, split, pid_c, C, B, nbb, items, reduce_ipp,
                     sxa, sxc, sxb, BLOCK_C, BLOCK_B, IDX64, KEEP)
        if _last_to_finish(count_ptr, pid_c, reduce_splits):
            offs_c, mask_c = _channel_offsets(pid_c, C, BLOCK_C)
            mean, var = _merge_stats(pshift_ptr, poff_ptr, pm2_ptr, offs_c, mask_c, C, B, nbb, items, reduce_ipp,
                                     reduce_splits, n_total, BLOCK_C, BLOCK_B, MERGE_ROWS)
            tl.store(mean_ptr + offs_c, mean, mask=mask_c)
            tl.store(var_ptr + offs_c, var, mask=mask_c)
            if UPDATE_RUNNING:
                _update_running(mean, var, rmean_ptr, rvar_ptr, offs_c, mask_c, n_total, momentum)
    else:
        split, pid_c = _role(index, elementwise_block, elementwise_splits)
        start, end = _items_of(split, elementwise_ipp, items)
        _apply_tiles(x_ptr, res_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pid_c, start, end, C, B, nbb, eps,
                     sxa, sxc, sxb, sra, src, srb, sya, syc, syb, BLOCK_C, BLOCK_B, IDX64, REVERSED, STREAM)


@triton.jit
def _update_running(mean, var, rmean_ptr, rvar_ptr, offs, mask, n_total, momentum):
    """``nn.BatchNorm2d``'s update of channels ``offs``, in place: ``running = (1 - momentum) * running +
    momentum * stat``, with the unbiased variance (``n_total`` values per channel)."""
    n = n_total.to(tl.float32)
    unbiased = var * n / (n - 1.0)
    rmean = tl.load(rmean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rvar = tl.load(rvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rmean = momentum * mean + (1.0 - momentum) * rmean
    rvar = momentum * unbiased + (1.0 - momentum) * rvar
    tl.store(rmean_ptr + offs, _cast_for(rmean_ptr, rmean), mask=mask)
    tl.store(rvar_ptr + offs, _cast_for(rvar_ptr, rvar), mask=mask)


@triton.jit
def _running_kernel(mean_ptr, var_ptr, rmean_ptr, rvar_ptr, C, n_total, momentum, BLOCK: tl.constexpr):
    """:func:`_update_running` from the mean and biased variance in memory (fp32 [C])."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0)
    var = tl.load(var_ptr + offs, mask=mask, other=0.0)
    _update_running(mean, var, rmean_ptr, rvar_ptr, offs, mask, n_total, momentum)


# --- backward ------------------------------------------------------------------------------------------------

@triton.jit
def _backward_tiles(
    dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pg_ptr, pgx_ptr, mean_g, mean_gx,
    split, pid_c, start, end, C, B, nbb, eps,
    sda, sdc, sdb, sxa, sxc, sxb, sea, sec, seb,
    REDUCE: tl.constexpr, WRITE_DX: tl.constexpr, TRAINING: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr,
    REVERSED: tl.constexpr, EVICT: tl.constexpr,
):
    """Over tiles [start, end) of channel block ``pid_c``, with ``g = dy * mish'(v)``, ``v = x_hat * w + b``,
    ``x_hat = (x - mean) * rstd``:

    - REDUCE: the sums of ``g`` and ``g * x_hat`` -> row ``split`` of the partials [splits, C];
    - WRITE_DX: ``dx = w * rstd * (g - mean_g - x_hat * mean_gx)`` (TRAINING; ``mean_g``, ``mean_gx``: the
      channel means of ``g`` and ``g * x_hat``, [BLOCK_C, 1]) or ``dx = w * rstd * g`` (eval). dx has
      strides (sea, sec, seb).

    The tiles are walked backwards when REVERSED (never while reducing: the sums keep their order); EVICT is
    the L2 eviction policy of the loads.
    """
    mean = _channel(mean_ptr, pid_c, C, BLOCK_C, 0.0)
    rstd = _rstd(_channel(var_ptr, pid_c, C, BLOCK_C, 1.0), eps)
    w = _channel(w_ptr, pid_c, C, BLOCK_C, 1.0)
    bias = _channel(b_ptr, pid_c, C, BLOCK_C, 0.0)
    acc_g = tl.zeros([BLOCK_C, BLOCK_B], tl.float32)
    acc_gx = tl.zeros([BLOCK_C, BLOCK_B], tl.float32)
    tl.static_assert(not (REDUCE and REVERSED), "a reduction walks its tiles in order")
    for i in range(start, end):
        a, c, b, mask = _tile(_nth_item(i, start, end, REVERSED), nbb, C, B, pid_c, BLOCK_C, BLOCK_B, IDX64)
        x_hat = (_load(x_ptr, a, c, b, sxa, sxc, sxb, mask, EVICT) - mean) * rstd
        # Masked lanes load dy = 0, so g = 0 there.
        g = _load(dy_ptr, a, c, b, sda, sdc, sdb, mask, EVICT) * mish_grad(
            x_hat * w + bias, x_ptr.dtype.element_ty)
        if REDUCE:
            acc_g += g
            acc_gx += g * x_hat
        if WRITE_DX:
            if TRAINING:
                g = g - mean_g - x_hat * mean_gx
            _store(dx_ptr, a, c, b, sea, sec, seb, mask, g * (w * rstd))
    if REDUCE:
        offs_c, mask_c = _channel_offsets(pid_c, C, BLOCK_C)
        tl.store(pg_ptr + split * C + offs_c, tl.sum(acc_g, axis=1), mask=mask_c)
        tl.store(pgx_ptr + split * C + offs_c, tl.sum(acc_gx, axis=1), mask=mask_c)


@triton.jit
def _column_sums(pg_ptr, pgx_ptr, offs, mask, C, splits, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """Column sums of the partials [splits, C] at ``offs`` [BLOCK], ROWS rows at a time as [BLOCK, ROWS]
    tiles, in a fixed order (deterministic; one row at a time, see :func:`_merge_stats`).

    The tiles add up elementwise in the loop and are reduced once after it. Written as ``acc += tl.sum(tile,
    axis=1)`` in the loop, Triton 3.6 (H200) compiled a reshape that mixed channels into each other's sums once
    the loop ran more than once: eval-mode weight and bias gradients 40-100% off (bench.diagnose_bn_mish)."""
    acc_g = tl.zeros([BLOCK, ROWS], tl.float32)
    acc_gx = tl.zeros([BLOCK, ROWS], tl.float32)
    offs, mask = offs[:, None], mask[:, None]
    for first in range(0, splits, ROWS):
        rows = first + tl.arange(0, ROWS)[None, :]
        tile_mask = mask & (rows < splits)
        acc_g += _load_partial(pg_ptr + rows * C + offs, tile_mask)
        acc_gx += _load_partial(pgx_ptr + rows * C + offs, tile_mask)
    return tl.sum(acc_g, axis=1), tl.sum(acc_gx, axis=1)


@triton.jit
def _sum_partials_if_last(pg_ptr, pgx_ptr, count_ptr, sum_g_ptr, sum_gx_ptr, pid_c, C, splits,
                          BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    """The last of channel block ``pid_c``'s ``splits`` reducing programs adds the block's partials up
    (:func:`_column_sums`) into ``sum_g`` and ``sum_gx``."""
    if _last_to_finish(count_ptr, pid_c, splits):
        offs_c, mask_c = _channel_offsets(pid_c, C, BLOCK_C)
        sum_g, sum_gx = _column_sums(pg_ptr, pgx_ptr, offs_c, mask_c, C, splits, BLOCK_C, ROWS)
        tl.store(sum_g_ptr + offs_c, sum_g, mask=mask_c)
        tl.store(sum_gx_ptr + offs_c, sum_gx, mask=mask_c)


@triton.jit
def _backward_kernel(
    dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pg_ptr, pgx_ptr, count_ptr, sum_g_ptr, sum_gx_ptr,
    C, B, nbb, items, splits, ipp, eps,
    sda, sdc, sdb, sxa, sxc, sxb, sea, sec, seb,
    REDUCE: tl.constexpr, WRITE_DX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr, EVICT: tl.constexpr,
    MERGE_ROWS: tl.constexpr,
):
    """:func:`_backward_tiles` without the batch-statistics terms (eval, or the sums alone), over program
    ``(split, channel block)``'s tiles (a 1-D grid of ``splits`` programs per channel block; EVICT as in
    :func:`_apply_kernel`); with REDUCE, the last program of each channel block adds up the block's partials
    into ``sum_g`` and ``sum_gx``."""
    split, pid_c = _role(tl.program_id(0), 0, splits)
    start, end = _items_of(split, ipp, items)
    _backward_tiles(dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pg_ptr, pgx_ptr, 0.0, 0.0,
                    split, pid_c, start, end, C, B, nbb, eps, sda, sdc, sdb, sxa, sxc, sxb, sea, sec, seb,
                    REDUCE, WRITE_DX, False, BLOCK_C, BLOCK_B, IDX64, False, EVICT)
    if REDUCE:
        _sum_partials_if_last(pg_ptr, pgx_ptr, count_ptr, sum_g_ptr, sum_gx_ptr, pid_c, C, splits,
                              BLOCK_C, MERGE_ROWS)


@triton.jit(do_not_specialize=PASS_ARGS)
def _train_backward_kernel(
    dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pg_ptr, pgx_ptr, count_ptr, sum_g_ptr, sum_gx_ptr,
    C, B, nbb, items, eps, inv_n,
    reduce_block, reduce_splits, reduce_ipp, reduce_programs, elementwise_block, elementwise_splits, elementwise_ipp,
    sda, sdc, sdb, sxa, sxc, sxb, sea, sec, seb,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr,
    REVERSED: tl.constexpr, KEEP: tl.constexpr, STREAM: tl.constexpr, MERGE_ROWS: tl.constexpr,
):
    """One launch of the pipelined training backward: ``reduce_programs`` programs reduce one channel
    group (the last program of each channel block adds its partials into ``sum_g`` and ``sum_gx``), the others
    write dx of the group reduced by the launch before, with the training formula (tiles and knobs as in
    :func:`_train_forward_kernel`)."""
    reducing, index = _launch_role(reduce_programs, REVERSED)
    if reducing:
        split, pid_c = _role(index, reduce_block, reduce_splits)
        start, end = _items_of(split, reduce_ipp, items)
        _backward_tiles(dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pg_ptr, pgx_ptr, 0.0, 0.0,
                        split, pid_c, start, end, C, B, nbb, eps, sda, sdc, sdb, sxa, sxc, sxb, sea, sec, seb,
                        True, False, False, BLOCK_C, BLOCK_B, IDX64, False, KEEP)
        _sum_partials_if_last(pg_ptr, pgx_ptr, count_ptr, sum_g_ptr, sum_gx_ptr, pid_c, C, reduce_splits,
                              BLOCK_C, MERGE_ROWS)
    else:
        split, pid_c = _role(index, elementwise_block, elementwise_splits)
        start, end = _items_of(split, elementwise_ipp, items)
        _backward_tiles(dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pg_ptr, pgx_ptr,
                        _channel(sum_g_ptr, pid_c, C, BLOCK_C, 0.0) * inv_n,
                        _channel(sum_gx_ptr, pid_c, C, BLOCK_C, 0.0) * inv_n,
                        split, pid_c, start, end, C, B, nbb, eps, sda, sdc, sdb, sxa, sxc, sxb, sea, sec, seb,
                        False, True, True, BLOCK_C, BLOCK_B, IDX64, REVERSED, STREAM)


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
    return _view_strides(t.shape, t.stride(), merge_n)


@functools.lru_cache(maxsize=4096)
def _view_strides(shape: torch.Size, stride: tuple[int, ...], merge_n: bool) -> tuple[int, int, int] | None:
    n, _, h, w = shape
    sn, sc, sh, sw = stride
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

    @property
    def block_elements(self) -> int:
        """Elements of one channel block of the tensor (``A * B * BLOCK_C``)."""
        return self.items // self.nbb * self.b * self.block_c

    def splits(self, programs: int, blocks: int | None = None) -> tuple[int, int]:
        """(programs, tiles per program) along the tiles of each channel block, when ``blocks`` channel
        blocks (default: all) share about ``programs`` programs."""
        # At most the target in all (rounding up would start a second, mostly idle wave of programs).
        splits = max(1, min(self.items, programs // (self.c_blocks if blocks is None else blocks)))
        ipp = cdiv(self.items, splits)
        return cdiv(self.items, ipp), ipp


@dataclass(frozen=True)
class Pass:
    """One pass of a pipelined launch over a channel group: channel blocks ``[first_block, first_block +
    blocks)``, each walked by ``splits`` programs of ``ipp`` tiles."""

    first_block: int
    blocks: int
    splits: int
    ipp: int

    @property
    def programs(self) -> int:
        return self.blocks * self.splits

    def args(self) -> tuple[int, int, int]:
        return self.first_block, self.splits, self.ipp


NO_PASS = Pass(0, 0, 1, 1)


@dataclass(frozen=True)
class Pipeline:
    """The launches of a pipelined training pass: launch ``j`` is (the reduction of group ``j``, the
    elementwise pass of group ``j - 1``); ``rows``: the most partials per channel (the largest ``splits``)."""

    launches: tuple[tuple[Pass, Pass], ...]
    rows: int


def pipeline(plan: Plan, device: torch.device, bytes_per_element: int) -> Pipeline:
    """Channel groups of ``plan`` whose re-read bytes (``bytes_per_element`` per element: x, plus dy in
    backward) fit :func:`group_budget`, and the launches that pipeline them."""
    budget = group_budget(device)
    most = max(1, budget // (plan.block_elements * bytes_per_element)) if budget > 0 else plan.c_blocks
    groups = cdiv(plan.c_blocks, most)
    return _pipeline(plan, target_programs(device), cdiv(plan.c_blocks, groups))  # groups of even sizes


@functools.lru_cache(maxsize=1024)
def _pipeline(plan: Plan, programs: int, group_blocks: int) -> Pipeline:
    if group_blocks < plan.c_blocks:
        programs = max(1, programs // 2)  # two passes share each launch
    groups = []
    for first in range(0, plan.c_blocks, group_blocks):
        blocks = min(group_blocks, plan.c_blocks - first)
        groups.append(Pass(first, blocks, *plan.splits(programs, blocks)))
    passes = [NO_PASS, *groups, NO_PASS]
    return Pipeline(tuple(zip(passes[1:], passes[:-1], strict=True)), max(g.splits for g in groups))


def pass_options(training_pass: str) -> dict[str, object]:
    """The pipelined training kernels' constexprs from the module's knobs (read at every call):
    ``SECOND_PASS_REVERSED``, ``L2_HINTS[training_pass]`` ("forward" or "backward") and ``MERGE_ROWS``."""
    keep, stream = ("evict_last", "evict_first") if L2_HINTS[training_pass] else ("", "")
    return {"REVERSED": SECOND_PASS_REVERSED, "KEEP": keep, "STREAM": stream, "MERGE_ROWS": MERGE_ROWS}


def group_budget(device: torch.device) -> int:
    """Bytes that one channel group's second pass may read again (0: no limit, one group): the
    ``CSPMIRROR_BN_GROUP_BYTES`` environment variable when set, else ``1 / L2_SHARE`` of the GPU's L2 cache
    (0 when L2_SHARE is, on the CPU and under the interpreter)."""
    value = os.environ.get(GROUP_BYTES_ENV)
    if value is not None:
        try:
            return max(0, int(value))
        except ValueError:
            raise ValueError(f"{GROUP_BYTES_ENV} must be an integer number of bytes, got {value!r}") from None
    if device.type != "cuda" or INTERPRETED or not L2_SHARE:
        return 0
    return _l2_bytes(device) // L2_SHARE


class Limits(NamedTuple):
    """The module's tile limits as a plan was made under (part of the cache key: tests change them)."""

    tile: int
    block_c_contiguous: int
    int32: int


def make_plan(x: torch.Tensor, others: Sequence[torch.Tensor | None] = ()) -> Plan | None:
    """A plan in which ``x`` and every tensor of ``others`` (None skipped) fit, or None. Cached on shapes
    and strides: for small tensors the host-side cost of a call is what a user waits for."""
    layouts = tuple((tuple(t.shape), t.stride()) for t in (x, *others) if t is not None)
    return _cached_plan(layouts, Limits(TILE, BLOCK_C_CONTIGUOUS, INT32_LIMIT))


@functools.lru_cache(maxsize=4096)
def _cached_plan(layouts: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...], limits: Limits) -> Plan | None:
    """:func:`make_plan` of tensors given as (shape, strides), ``x`` first."""
    tensors = [torch.empty_strided(shape, stride, device="meta") for shape, stride in layouts]
    for merge_n in (True, False):
        if all(view_strides(t, merge_n) is not None for t in tensors):
            return _plan(tensors[0], merge_n, tensors, limits)
    return None


def _plan(x: torch.Tensor, merge_n: bool, tensors: Sequence[torch.Tensor], limits: Limits) -> Plan:
    n, c, h, w = x.shape
    a, b = (1, n * h * w) if merge_n else (n, h * w)
    if view_strides(x, merge_n)[1] == 1 and c > 1:  # channels innermost
        block_c = min(next_power_of_2(c), limits.block_c_contiguous)
        block_b = min(next_power_of_2(b), limits.tile // block_c)
    else:
        block_b = min(next_power_of_2(b), limits.tile)
        block_c = min(next_power_of_2(c), limits.tile // block_b)
    nbb = cdiv(b, block_b)
    # The largest offset any lane computes, masked lanes of the padded tile included (int32 arithmetic must
    # hold it, each term too).
    padded = (a, cdiv(c, block_c) * block_c, nbb * block_b)
    reach = max(sum((extent - 1) * abs(stride) for extent, stride in zip(padded, view_strides(t, merge_n),
                                                                          strict=True))
                for t in tensors)
    return Plan(merge_n, c, b, block_c, block_b, nbb, a * nbb, reach > limits.int32)


def _max_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


def target_programs(device: torch.device) -> int:
    """Programs a pass aims for in all: PROGRAMS_PER_SM per SM (a few in the interpreter)."""
    return INTERPRETER_PROGRAMS if INTERPRETED else PROGRAMS_PER_SM * _device_property(device, "multi_processor_count")


def _l2_bytes(device: torch.device) -> int:
    return _device_property(device, "L2_cache_size")


def _device_property(device: torch.device, name: str) -> int:
    """A CUDA device's property (1 on the CPU; 0 when this torch does not report it)."""
    if device.type != "cuda":
        return 1
    return _device_property_cached(device.index if device.index is not None else torch.cuda.current_device(), name)


@functools.cache
def _device_property_cached(index: int, name: str) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), name, 0))


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
    plan = make_plan(x, [*inputs, output])
    if plan is not None and (output is None or not _overlaps_inexactly(output, [x, *inputs])):
        return plan, x, list(inputs), output  # the common case, one plan look-up (host time per call)
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


def train_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, eps: float, out: torch.Tensor,
                  running: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``out = mish((x - mean) / sqrt(var + eps) * weight + bias) (+ residual)`` with x's batch statistics.

    Args:
        x, residual, out: [N, C, H, W] (N*H*W >= 2), any strides (``out`` e.g. a channel slice of a larger
            buffer; it may also be ``x`` itself). weight, bias: [C], any float dtype, or None.
        running: (running_mean, running_var, momentum) to update in place as :func:`update_running` does, in
            the same launch (no launch of its own), or None.

    Returns:
        mean, biased variance: fp32 [C].
    """
    plan, x_in, (res,), y = _prepare(x, [residual], out)
    weight, bias = _vectors(weight, bias)
    c, device, count = plan.c, x.device, x.numel() // plan.c
    rmean, rvar, momentum = running if running is not None else (None, None, 0.0)
    fuse_update = rmean is not None and rmean.is_contiguous() and rvar.is_contiguous()  # (contiguous pointers)
    work = pipeline(plan, device, x_in.element_size())
    pshift, poff, pm2 = (new_fp32(work.rows, c, device=device) for _ in range(3))
    mean, var = new_fp32(c, device=device), new_fp32(c, device=device)
    strides = (*plan.strides(x_in), *_strides_or_zeros(plan, res), *plan.strides(y))
    options = pass_options("forward")
    with on_device(device):
        counts = zeroed_counters(plan.c_blocks, device)
        for stats, normalize in work.launches:
            _train_forward_kernel[(stats.programs + normalize.programs,)](
                x_in, res, y, mean, var, weight, bias, pshift, poff, pm2, counts,
                rmean if fuse_update else None, rvar if fuse_update else None,
                c, plan.b, plan.nbb, plan.items, float(eps), count, float(momentum),
                *stats.args(), stats.programs, *normalize.args(), *strides,
                BLOCK_C=plan.block_c, BLOCK_B=plan.block_b, IDX64=plan.idx64, UPDATE_RUNNING=fuse_update,
                num_warps=NUM_WARPS, **options,
            )
    if rmean is not None and not fuse_update:
        update_running(mean, var, rmean, rvar, momentum, count)
    if y is not out:
        out.copy_(y)
    return mean, var


def update_running(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor,
                   running_var: torch.Tensor, momentum: float, count: int) -> None:
    """``nn.BatchNorm2d``'s running statistics update, in place: ``running = (1 - momentum) * running +
    momentum * stat`` with the unbiased variance (``var * count / (count - 1)``).

    Args:
        mean, var: the batch mean and biased variance, fp32 [C]. running_mean, running_var: [C], any float
            dtype and strides. count: values per channel in the batch (N*H*W >= 2).
    """
    if not (running_mean.is_contiguous() and running_var.is_contiguous()):
        # The kernel writes through contiguous pointers.
        rm, rv = running_mean.contiguous(), running_var.contiguous()
        update_running(mean, var, rm, rv, momentum, count)
        running_mean.copy_(rm)
        running_var.copy_(rv)
        return
    c = mean.numel()
    with on_device(mean.device):
        _running_kernel[(cdiv(c, VECTOR_BLOCK),)](mean, var, running_mean, running_var, c, count,
                                                  float(momentum), BLOCK=VECTOR_BLOCK)


def apply(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float, weight: torch.Tensor | None,
          bias: torch.Tensor | None, residual: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = mish((x - mean) / sqrt(var + eps) * weight + bias) (+ residual)`` from given statistics.

    Args:
        x, residual, out: [N, C, H, W], any strides (``out`` e.g. a channel slice of a larger buffer; it may
            also be ``x`` itself). mean, var, weight, bias: [C], any float dtype (weight, bias may be None).
    """
    plan, x_in, (res,), y = _prepare(x, [residual], out)
    mean, var, weight, bias = _vectors(mean, var, weight, bias)
    with on_device(x.device):
        _apply_kernel[(plan.items * plan.c_blocks,)](
            x_in, res, y, mean, var, weight, bias, plan.c, plan.b, plan.nbb, plan.items, float(eps),
            *plan.strides(x_in), *_strides_or_zeros(plan, res), *plan.strides(y),
            BLOCK_C=plan.block_c, BLOCK_B=plan.block_b, IDX64=plan.idx64, EVICT="", num_warps=NUM_WARPS,
        )
    if y is not out:
        out.copy_(y)


_COUNTERS: dict[tuple[str, int | None, int], torch.Tensor] = {}  # (device type, index, stream) -> zeroed int32
_MAX_COUNTER_SETS = 64


def zeroed_counters(blocks: int, device: torch.device) -> torch.Tensor:
    """int32 [>= blocks] of zeros: how many programs of each channel block have finished reducing.

    The kernels leave them zero (:func:`_last_to_finish`), so one buffer per device and stream serves every
    launch on that stream one after the other, without a fill kernel per call. A launch being captured into a
    CUDA graph gets a fresh zeroed buffer instead (the fill is then part of the graph)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(blocks, dtype=torch.int32, device=device)
        key = ("cuda", index, torch._C._cuda_getCurrentRawStream(index))
    else:
        key = (device.type, device.index, 0)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < blocks:
        if len(_COUNTERS) >= _MAX_COUNTER_SETS:
            _COUNTERS.clear()  # (a buffer still in use on its stream is freed in stream order)
        counters = _COUNTERS[key] = torch.zeros(max(blocks, 1024), dtype=torch.int32, device=device)
    return counters


def _strides_or_zeros(plan: Plan, t: torch.Tensor | None) -> tuple[int, int, int]:
    return plan.strides(t) if t is not None else (0, 0, 0)


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
    with on_device(x.device):
        if training and dx_out is not None:
            sums = _train_backward(plan, dy_in, x_in, dx_out, args)
        elif training or need_sums:
            # In eval, dx does not depend on the sums: it is written in the same pass.
            sums = _reduce_backward(plan, dy_in, x_in, None if training else dx_out, args)
        elif dx_out is not None:
            _launch_backward(plan, dy_in, x_in, dx_out, args, None, plan.items, 1)
    if dx is not None and dx_out is not dx:
        dx.copy_(dx_out)
    return sums


def _train_backward(plan: Plan, dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor,
                    args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipelined training backward: dx, and the per-channel sums of g and g * x_hat in fp32 [C]."""
    mean, var, eps, weight, bias = args
    c, device = plan.c, x.device
    work = pipeline(plan, device, x.element_size() + dy.element_size())
    pg, pgx = new_fp32(work.rows, c, device=device), new_fp32(work.rows, c, device=device)
    sum_g, sum_gx = new_fp32(c, device=device), new_fp32(c, device=device)
    strides = (*plan.strides(dy), *plan.strides(x), *plan.strides(dx))
    counts = zeroed_counters(plan.c_blocks, device)
    options = pass_options("backward")
    for reduce, write_dx in work.launches:
        _train_backward_kernel[(reduce.programs + write_dx.programs,)](
            dy, x, dx, mean, var, weight, bias, pg, pgx, counts, sum_g, sum_gx,
            c, plan.b, plan.nbb, plan.items, float(eps), 1.0 / (x.numel() // c),
            *reduce.args(), reduce.programs, *write_dx.args(), *strides,
            BLOCK_C=plan.block_c, BLOCK_B=plan.block_b, IDX64=plan.idx64, num_warps=NUM_WARPS, **options,
        )
    return sum_g, sum_gx


def _reduce_backward(plan: Plan, dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor | None,
                     args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel sums of g and g * x_hat in fp32 [C] (and eval's dx in the same pass when given)."""
    c, device = plan.c, x.device
    splits, ipp = plan.splits(target_programs(device))
    partials = new_fp32(splits, c, device=device), new_fp32(splits, c, device=device)
    sums = new_fp32(c, device=device), new_fp32(c, device=device)
    _launch_backward(plan, dy, x, dx, args, (*partials, zeroed_counters(plan.c_blocks, device), *sums), splits,
                     ipp)
    return sums


def _launch_backward(plan: Plan, dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor | None, args: tuple,
                     reduction: tuple[torch.Tensor, ...] | None, programs: int, ipp: int) -> None:
    """One ``_backward_kernel`` launch (no batch-statistics terms): reduces when ``reduction`` (the two
    partials [programs, C], the zeroed counters, sum_g and sum_gx [C]) is given, writes ``dx`` when given."""
    mean, var, eps, weight, bias = args
    _backward_kernel[(programs * plan.c_blocks,)](
        dy, x, dx, mean, var, weight, bias, *(reduction if reduction is not None else (None,) * 5),
        plan.c, plan.b, plan.nbb, plan.items, programs, ipp, float(eps),
        *plan.strides(dy), *plan.strides(x), *_strides_or_zeros(plan, dx),
        REDUCE=reduction is not None, WRITE_DX=dx is not None,
        BLOCK_C=plan.block_c, BLOCK_B=plan.block_b, IDX64=plan.idx64, EVICT="", MERGE_ROWS=MERGE_ROWS,
        num_warps=NUM_WARPS,
    )
