"""Triton kernels for ``mirror_split`` and ``mirror_fuse`` (SPEC §1.1, §1.2, §3), and their launchers.

Both kernels walk their OUTPUT in its physical order: dim 0 is the batch, dims 1..3 are the output's other
dims sorted by stride (d3 is the contiguous one: W for NCHW, C for channels_last). Each program owns one
batch index and one [B1, B2, B3] tile of dims 1..3, so there is no per-element division (``Tiling.flat``
instead numbers dims 1..3 as one flat index in tiles of B3, so that no lane idles where a dim is not a power
of two, e.g. NCHW rows of P = 40; a division per group of lanes finds the indices); the input is read
through its own strides (permuted into the same order), and the flip and the overlap are index arithmetic on
whichever of dims 1..3 is the split axis (``SPLIT_DIM``). Loads and stores along d3 vectorise where strides
allow (see ``ALIGN``). Dim 3 is indexed in groups of ALIGN lanes: a mirrored read along a contiguous split
axis (NCHW, axis=-1) reads each group forwards, vectorised, and reverses it in registers (:func:`_flip_lanes`),
where an element-wise backwards read would be scalar (``Tiling.flip_in_registers``; :data:`TILINGS` holds the
GPU tiling knobs).

- split: ``y[n] = x[n]`` read at ``j`` (part 1) and at ``L - P + j`` or, mirrored, ``L - 1 - j`` (part 2);
  one program writes the tile of both parts, so the overlap's second read comes from the cache. One read and
  one write per element; ``HALVE`` halves the overlap (the adjoint of ``reduce="mean"``).
- fuse: ``out[n, l] = (0 + z1[n, l]) + z2[n, l']`` with each term present only where that part covers
  ``l``; every part element is read once and every output element written once (no zero fill, no cat,
  no flip copy). One launch per part, into its channel slice of the output: parts may differ in strides
  and memory format, and a launch per part lets each specialise on its own strides (alignment, unit
  stride), which a single launch over a table of parts could not.

Sums are computed in fp32 (fp64 for fp64) and rounded to the output dtype once, as PyTorch's eager ``add_``
does, so the results are bit-identical to :mod:`cspmirror.ops.reference`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cspmirror.backends import triton_interpreted

from .launch import cdiv, next_power_of_2, on_device

_INT32_MAX = 2**31 - 1


class Tiling(NamedTuple):
    """How the GPU walks the output of one kind of call (the interpreter plans its own large tiles)."""

    tile_bytes: int  # bytes of output per program
    per_thread: int  # elements per thread: warps = elements / (32 * this), at most 8
    flat: bool  # number dims 1..3 as one flat index (see the module doc) instead of [B1, B2, B3] tiles
    flip_in_registers: bool  # mirrored reads along the contiguous dim: vector loads flipped in registers, or
    # reversed element-wise loads
    split_loads_first: bool  # the split reads both parts before it writes either (else: read, write, read, write)


# The tiling per kind of call: "along" when the split axis is the contiguous one (NCHW split along W), "across"
# otherwise (channels_last; also NCHW split along H, not measured). Measured on an H200 (python -m
# bench.mirror_tiles, [64, 256, 64, 64] bf16 forward, split along W, CUDA-graph device time; run 3 in
# bench/results/nvidia-h200): flat tiles reach 94-99% of copy bandwidth in both layouts, against 50-57% (NCHW)
# and 77-83% (channels_last) for row tiles, whose rows of P = 40 leave lanes idle. Among the flat variants
# (element-wise mirrored reads, the split's reads first) the differences were under 1%, so those keep their
# defaults. 8 KiB along and 4 KiB across were best with row tiles (not re-measured with flat ones).
TILINGS = {
    "along": Tiling(tile_bytes=8192, per_thread=16, flat=True, flip_in_registers=True, split_loads_first=False),
    "across": Tiling(tile_bytes=4096, per_thread=16, flat=True, flip_in_registers=True, split_loads_first=False),
}


def tilings_with(**changes: object) -> dict[str, Tiling]:
    """:data:`TILINGS` with ``changes`` (fields of :class:`Tiling`) made to every kind of call."""
    return {kind: tiling._replace(**changes) for kind, tiling in TILINGS.items()}


@triton.jit
def _tile(t1, t2, t3, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, V: tl.constexpr, INT64: tl.constexpr):
    """Indices of tile (t1, t2, t3) as 4-D tensors that broadcast together: i1 [B1, 1, 1, 1], i2 [1, B2, 1, 1],
    and dim 3 in groups of V lanes, ``i3 = group + lane`` with group [1, 1, B3 / V, 1] (multiples of V) and
    lane [1, 1, 1, V]. Keeping the two apart lets a mirrored read along dim 3 be written as a forward
    (vectorisable) read of each group, flipped in registers (see :func:`_mirrored_load`)."""
    i1 = t1 * B1 + tl.arange(0, B1)
    i2 = t2 * B2 + tl.arange(0, B2)
    if INT64:
        i1 = i1.to(tl.int64)
        i2 = i2.to(tl.int64)
    group, lane = _lane_groups(t3, B3, V, INT64)
    return i1[:, None, None, None], i2[None, :, None, None], group[None, None, :, None], lane[None, None, None, :]


@triton.jit
def _lane_groups(t, B: tl.constexpr, V: tl.constexpr, INT64: tl.constexpr):
    """The first index of each group of V lanes of tile ``t`` of B indices [B / V], and the lanes [V]."""
    if INT64:
        t = tl.cast(t, tl.int64)  # before the product: a flat tile's t * B passes 2^31 past 2^31 elements
    first = t * B + tl.arange(0, B // V) * V
    lane = tl.arange(0, V)
    if INT64:
        lane = lane.to(tl.int64)
    return first, lane


@triton.jit
def _pick(i1, i2, i3, SPLIT_DIM: tl.constexpr):
    """The index along the split axis."""
    if SPLIT_DIM == 1:
        j = i1
    elif SPLIT_DIM == 2:
        j = i2
    else:
        j = i3
    return j


@triton.jit
def _offsets(i1, i2, i3, s1, s2, s3, j, SPLIT_DIM: tl.constexpr):
    """Element offsets with the split axis's index replaced by ``j``."""
    if SPLIT_DIM == 1:
        off = j * s1 + i2 * s2 + i3 * s3
    elif SPLIT_DIM == 2:
        off = i1 * s1 + j * s2 + i3 * s3
    else:
        off = i1 * s1 + i2 * s2 + j * s3
    return off


@triton.jit
def _widen(v, COMPUTE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """``v`` converted exactly to COMPUTE (fp32, or fp64 for fp64).

    SOFT_BF16 is set under the interpreter, whose bf16 <-> fp32 casts lose subnormals and truncate: there
    the conversions are done on the bits. On the GPU ``.to`` is exact (and ``cvt.rn`` for the rounding).
    """
    if SOFT_BF16:
        w = (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        w = v.to(COMPUTE)
    return w


@triton.jit
def _round(v, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """``v`` (fp32, or fp64 for fp64) rounded to DTYPE, to nearest even (see :func:`_widen`; SOFT_BF16 is only
    set when DTYPE is bf16)."""
    if SOFT_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        r = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        r = tl.where(v == v, r, v.to(tl.bfloat16))  # NaN stays NaN (the carry could make it inf)
    else:
        r = v.to(DTYPE)
    return r


@triton.jit
def _flat_tile(t, size1, size2, size3, B3: tl.constexpr, V: tl.constexpr, INT64: tl.constexpr):
    """Tile ``t`` of dims 1..3 numbered as one flat index in their physical order: the indices as :func:`_tile`
    gives them, but shaped [1, 1, B3 / V, 1] (lane: [1, 1, 1, V]), and the mask of the positions inside the
    sizes. V divides size3, so a group never straddles two rows."""
    flat, lane = _lane_groups(t, B3, V, INT64)
    if INT64:
        # tl.cast, not .to(): a size of 1 arrives as a plain int (Triton specialises arguments equal to 1)
        size1 = tl.cast(size1, tl.int64)
        size2 = tl.cast(size2, tl.int64)
        size3 = tl.cast(size3, tl.int64)
    plane = size2 * size3
    i1 = flat // plane
    rest = flat - i1 * plane
    i2 = rest // size3
    group = rest - i2 * size3
    mask = flat[:, None] + lane[None, :] < size1 * plane
    return (i1[None, None, :, None], i2[None, None, :, None], group[None, None, :, None], lane[None, None, None, :],
            mask[None, None, :, :])


@triton.jit
def _program_tile(tiles1, tiles2, tiles3, INT64: tl.constexpr):
    """(batch index, t1, t2, t3) of this program; the innermost tile varies fastest."""
    pid = tl.program_id(0)
    t3 = pid % tiles3
    pid = pid // tiles3
    t2 = pid % tiles2
    pid = pid // tiles2
    t1 = pid % tiles1
    n = pid // tiles1
    if INT64:
        n = n.to(tl.int64)
    return n, t1, t2, t3


@triton.jit
def _program_indices(tiles1, tiles2, tiles3, size1, size2, size3, B1: tl.constexpr, B2: tl.constexpr,
                     B3: tl.constexpr, V: tl.constexpr, INT64: tl.constexpr, FLAT: tl.constexpr):
    """This program's batch index, its tile's indices (see :func:`_tile`, or :func:`_flat_tile` when FLAT) and
    the mask of the tile's positions inside sizes 1..3."""
    n, t1, t2, t3 = _program_tile(tiles1, tiles2, tiles3, INT64)
    if FLAT:
        i1, i2, group, lane, mask = _flat_tile(t3, size1, size2, size3, B3, V, INT64)
    else:
        i1, i2, group, lane = _tile(t1, t2, t3, B1, B2, B3, V, INT64)
        mask = (i1 < size1) & (i2 < size2) & (group + lane < size3)
    return n, i1, i2, group, lane, mask


@triton.jit
def _flip_lanes(v, V: tl.constexpr):
    """``v`` [B1, B2, G, V] reversed along its last dim (V a power of two): reversing the lane index means
    complementing each of its bits, one split/join swap per bit. One thread holds the V lanes, so on the GPU
    these are register moves; ``tl.flip`` would do the same there, but it reduces with a custom combine,
    which crawls in the interpreter."""
    B1: tl.constexpr = v.shape[0]
    B2: tl.constexpr = v.shape[1]
    G: tl.constexpr = v.shape[2]
    for k in tl.static_range(V.bit_length() - 1):
        w = tl.permute(tl.reshape(v, [B1, B2, G * (V >> (k + 1)), 2, 1 << k]), [0, 1, 2, 4, 3])
        low, high = tl.split(w)
        v = tl.reshape(tl.permute(tl.join(high, low), [0, 1, 2, 4, 3]), [B1, B2, G, V])
    return v


@triton.jit
def _mirrored_load(base, i1, i2, group, lane, s1, s2, s3, start, mask, SPLIT_DIM: tl.constexpr, V: tl.constexpr,
                   FLIP: tl.constexpr):
    """Load ``base`` at split-axis index ``start - j`` for each tile position (j its split-axis index), 0 where
    masked.

    Along dim 3 (the contiguous one) a backwards read would be scalar; with FLIP, each group of V lanes reads
    its V elements forwards, from ``start - (group + V - 1)`` on, and flips them in registers. ``mask`` must
    be uniform over each group (the launcher makes V divide L and P).
    """
    if SPLIT_DIM == 3 and FLIP:
        ahead = (start - (V - 1)) - group + lane
        v = tl.load(base + (i1 * s1 + i2 * s2 + ahead * s3), mask=mask, other=0.0)
        v = _flip_lanes(v, V)
    else:
        i3 = group + lane
        j = _pick(i1, i2, i3, SPLIT_DIM)
        v = tl.load(base + _offsets(i1, i2, i3, s1, s2, s3, start - j, SPLIT_DIM), mask=mask, other=0.0)
    return v


@triton.jit
def _split_part(x_base, mask, i1, i2, group, lane, xs1, xs2, xs3, start, length, width,
                MIRRORED: tl.constexpr, SPLIT_DIM: tl.constexpr, HALVE: tl.constexpr, COMPUTE: tl.constexpr,
                SOFT_BF16: tl.constexpr, V: tl.constexpr, FLIP: tl.constexpr):
    """One tile of one part: ``x`` read at ``start + j`` (or ``start - j`` when MIRRORED; FLIP: see
    :func:`_mirrored_load`), the overlap halved when HALVE."""
    i3 = group + lane
    j = _pick(i1, i2, i3, SPLIT_DIM)
    if MIRRORED:
        v = _mirrored_load(x_base, i1, i2, group, lane, xs1, xs2, xs3, start, mask, SPLIT_DIM, V, FLIP)
        src = start - j
    else:
        src = start + j
        v = tl.load(x_base + _offsets(i1, i2, i3, xs1, xs2, xs3, src, SPLIT_DIM), mask=mask)
    if HALVE:
        in_overlap = (src >= length - width) & (src < width)
        v = tl.where(in_overlap, _round(_widen(v, COMPUTE, SOFT_BF16) * 0.5, v.dtype, SOFT_BF16), v)
    return v


@triton.jit
def _second_part(x_base, mask, i1, i2, group, lane, xs1, xs2, xs3, length, width, MIRROR: tl.constexpr,
                 SPLIT_DIM: tl.constexpr, HALVE: tl.constexpr, COMPUTE: tl.constexpr, SOFT_BF16: tl.constexpr,
                 V: tl.constexpr, FLIP: tl.constexpr):
    """:func:`_split_part` of the second part: from the end, mirrored or not."""
    if MIRROR:
        v = _split_part(x_base, mask, i1, i2, group, lane, xs1, xs2, xs3, length - 1, length, width,
                        True, SPLIT_DIM, HALVE, COMPUTE, SOFT_BF16, V, FLIP)
    else:
        v = _split_part(x_base, mask, i1, i2, group, lane, xs1, xs2, xs3, length - width, length, width,
                        False, SPLIT_DIM, HALVE, COMPUTE, SOFT_BF16, V, FLIP)
    return v


@triton.jit
def _aligned_back(in0, in1, in2, out0, out1, out2, size3, length, width, SPLIT_DIM: tl.constexpr,
                  ALIGN: tl.constexpr, INT64: tl.constexpr):
    """The row quantities the launcher divided by ALIGN (strides of dims 0..2 in and out, size3, and L, P
    when SPLIT_DIM == 3), multiplied back: the compiler then knows they are multiples of ALIGN. INT64: in 64
    bits, before the product (a quotient that fits 32 bits may not, multiplied back; and the split's second
    half starts at ``n_half`` times the batch stride)."""
    if INT64:
        in0, in1, in2 = _as_int64(in0), _as_int64(in1), _as_int64(in2)
        out0, out1, out2 = _as_int64(out0), _as_int64(out1), _as_int64(out2)
        size3, length, width = _as_int64(size3), _as_int64(length), _as_int64(width)
    if SPLIT_DIM == 3:
        length *= ALIGN
        width *= ALIGN
    return (in0 * ALIGN, in1 * ALIGN, in2 * ALIGN, out0 * ALIGN, out1 * ALIGN, out2 * ALIGN, size3 * ALIGN,
            length, width)


@triton.jit
def _as_int64(v):
    """``v`` in int64 (``tl.cast``, not ``.to()``: an argument equal to 1 arrives as a plain int)."""
    return tl.cast(v, tl.int64)


@triton.jit
def mirror_split_kernel(
    x_ptr, y_ptr, n_half, length, width,
    size1, size2, size3,
    xs0, xs1, xs2, xs3,
    ys0, ys1, ys2, ys3,
    tiles1, tiles2, tiles3,
    SPLIT_DIM: tl.constexpr, MIRROR: tl.constexpr, HALVE: tl.constexpr, ALIGN: tl.constexpr,
    INT64: tl.constexpr, COMPUTE: tl.constexpr, SOFT_BF16: tl.constexpr,
    B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, FLAT: tl.constexpr, FLIP: tl.constexpr,
    LOADS_FIRST: tl.constexpr,
):
    """y [2N, ...] = mirror_split(x [N, ...]); sizes and strides are in y's physical order (see module doc).

    The launcher divides the row quantities (strides of dims 0..2, size3, and L, P when SPLIT_DIM == 3)
    by ALIGN; multiplying back here tells the compiler they are multiples of ALIGN, which vectorises
    loads and stores along dim 3 (Triton alone only knows "multiple of 16").
    """
    xs0, xs1, xs2, ys0, ys1, ys2, size3, length, width = _aligned_back(
        xs0, xs1, xs2, ys0, ys1, ys2, size3, length, width, SPLIT_DIM, ALIGN, INT64)
    n, i1, i2, group, lane, mask = _program_indices(tiles1, tiles2, tiles3, size1, size2, size3,
                                                    B1, B2, B3, ALIGN, INT64, FLAT)
    i3 = group + lane
    x_base = x_ptr + n * xs0
    y_ptrs = y_ptr + n * ys0 + (i1 * ys1 + i2 * ys2 + i3 * ys3)
    # Both parts of the tile in one program: the overlap's second read hits the cache.
    first = _split_part(x_base, mask, i1, i2, group, lane, xs1, xs2, xs3, 0, length, width,
                        False, SPLIT_DIM, HALVE, COMPUTE, SOFT_BF16, ALIGN, FLIP)
    if LOADS_FIRST:  # both reads in flight at once (the compiler cannot move a load above a store)
        second = _second_part(x_base, mask, i1, i2, group, lane, xs1, xs2, xs3, length, width, MIRROR,
                              SPLIT_DIM, HALVE, COMPUTE, SOFT_BF16, ALIGN, FLIP)
        tl.store(y_ptrs, first, mask=mask)
    else:
        tl.store(y_ptrs, first, mask=mask)
        second = _second_part(x_base, mask, i1, i2, group, lane, xs1, xs2, xs3, length, width, MIRROR,
                              SPLIT_DIM, HALVE, COMPUTE, SOFT_BF16, ALIGN, FLIP)
    tl.store(y_ptrs + n_half * ys0, second, mask=mask)


@triton.jit
def mirror_fuse_kernel(
    p_ptr, o_ptr, n_half, length, width,
    size1, size2, size3,
    ps0, ps1, ps2, ps3,
    os0, os1, os2, os3,
    tiles1, tiles2, tiles3,
    SPLIT_DIM: tl.constexpr, MIRROR: tl.constexpr, MEAN: tl.constexpr, ALIGN: tl.constexpr,
    INT64: tl.constexpr, COMPUTE: tl.constexpr, SOFT_BF16: tl.constexpr,
    B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, FLAT: tl.constexpr, FLIP: tl.constexpr,
):
    """out [N, C_k, ...] (a channel slice) = mirror_fuse of one part [2N, C_k, ...]; sizes and strides in
    out's physical order, row quantities divided by ALIGN as in :func:`mirror_split_kernel`."""
    ps0, ps1, ps2, os0, os1, os2, size3, length, width = _aligned_back(
        ps0, ps1, ps2, os0, os1, os2, size3, length, width, SPLIT_DIM, ALIGN, INT64)
    n, i1, i2, group, lane, mask = _program_indices(tiles1, tiles2, tiles3, size1, size2, size3,
                                                    B1, B2, B3, ALIGN, INT64, FLAT)
    i3 = group + lane
    pos = _pick(i1, i2, i3, SPLIT_DIM)
    in_first = pos < width
    in_second = pos >= length - width
    a = tl.load(p_ptr + n * ps0 + _offsets(i1, i2, i3, ps1, ps2, ps3, pos, SPLIT_DIM),
                mask=mask & in_first, other=0.0)
    second_base = p_ptr + (n + n_half) * ps0
    if MIRROR:
        b = _mirrored_load(second_base, i1, i2, group, lane, ps1, ps2, ps3, length - 1, mask & in_second,
                           SPLIT_DIM, ALIGN, FLIP)
    else:
        src2 = pos - (length - width)
        b = tl.load(second_base + _offsets(i1, i2, i3, ps1, ps2, ps3, src2, SPLIT_DIM),
                    mask=mask & in_second, other=0.0)
    a = _widen(a, COMPUTE, SOFT_BF16)
    b = _widen(b, COMPUTE, SOFT_BF16)
    # The reference adds both parts into zeros: (0 + a) + b, rounded to the dtype once. The "0 +" is not
    # a no-op: -0.0 + -0.0 on the overlap must give +0.0 (elsewhere the masked term's +0.0 does that).
    out = _round((a + 0.0) + b, o_ptr.dtype.element_ty, SOFT_BF16)
    if MEAN:
        # The reference halves the already rounded sum (``div_(2)`` on the output).
        halved = _round(_widen(out, COMPUTE, SOFT_BF16) * 0.5, o_ptr.dtype.element_ty, SOFT_BF16)
        out = tl.where(in_first & in_second, halved, out)
    tl.store(o_ptr + n * os0 + (i1 * os1 + i2 * os2 + i3 * os3), out, mask=mask)


# ---------------------------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class _Plan:
    """Launch geometry shared by both kernels: everything in ``out``'s physical order."""

    sizes: tuple[int, int, int]          # sizes of dims 1..3
    in_strides: tuple[int, int, int, int]
    out_strides: tuple[int, int, int, int]
    split_dim: int
    blocks: tuple[int, int, int]
    tiles: tuple[int, int, int]
    align: int
    int64: bool
    soft_bf16: bool
    num_warps: int
    args: tuple[int, ...]  # the kernels' integer arguments after ``n_half``
    meta: dict = field(hash=False)  # their constexpr and launch options
    grid: tuple[int]
    split_loads_first: bool  # the split kernel's own constexpr


def _physical_order(stride: tuple[int, ...]) -> list[int]:
    """Dims of a 4-D tensor, batch first, the others by decreasing stride (ties keep NCHW order)."""
    return [0] + sorted((1, 2, 3), key=lambda d: -stride[d])


def _strides(shape: tuple[int, ...], stride: tuple[int, ...], order: list[int]) -> list[int]:
    """Strides in ``order``; size-1 dims get stride 0 (never stepped, and it keeps ALIGN large)."""
    return [stride[d] if shape[d] > 1 else 0 for d in order]


def _blocks(sizes: list[int], max_elems: int) -> tuple[int, int, int]:
    """Power-of-two tile [B1, B2, B3] of at most ``max_elems`` elements, filled from the innermost dim."""
    b3 = min(next_power_of_2(sizes[2]), max_elems)
    b2 = min(next_power_of_2(sizes[1]), max(1, max_elems // b3))
    b1 = min(next_power_of_2(sizes[0]), max(1, max_elems // (b3 * b2)))
    return b1, b2, b3


def _pow2_divisor(values: list[int], cap: int) -> int:
    """Largest power of two <= cap dividing every value."""
    a = cap
    for v in values:
        while v % a:
            a //= 2
    return a


def _span(extents: list[int], strides: list[int]) -> int:
    """Bound on |offset| for indices with |index| <= extent on each dim (masked lanes included)."""
    return sum(e * abs(s) for e, s in zip(extents, strides, strict=True))


def _plan(inp: torch.Tensor, out: torch.Tensor, axis: int, batch: int, length: int, width: int,
          force_int64: bool) -> _Plan:
    """The launch plan of one call. Cached on shapes and strides: for small tensors the host-side cost of a
    call is what a user waits for, and working the plan out again costs more than the launch itself."""
    return _cached_plan(tuple(inp.shape), inp.stride(), tuple(out.shape), out.stride(), inp.dtype,
                        inp.element_size(), axis % 4, batch, length, width, force_int64, triton_interpreted(),
                        (TILINGS["along"], TILINGS["across"]))


@functools.lru_cache(maxsize=4096)
def _cached_plan(in_shape: tuple[int, ...], in_stride: tuple[int, ...], out_shape: tuple[int, ...],
                 out_stride: tuple[int, ...], dtype: torch.dtype, element_size: int, axis: int, batch: int,
                 length: int, width: int, force_int64: bool, interpreted: bool,
                 tilings: tuple[Tiling, Tiling]) -> _Plan:
    order = _physical_order(out_stride)
    sizes = [out_shape[d] for d in order[1:]]
    in_strides, out_strides = _strides(in_shape, in_stride, order), _strides(out_shape, out_stride, order)
    split_dim = order.index(axis)
    row_values = in_strides[:3] + out_strides[:3] + [sizes[2]]
    if split_dim == 3:
        row_values += [length, width]
    a = _pow2_divisor(row_values, max(1, 16 // element_size))
    tiling = tilings[0] if split_dim == 3 else tilings[1]  # along, across
    # Big tiles in the interpreter, where each program costs Python time.
    max_elems = 8192 if interpreted else max(1024, tiling.tile_bytes // element_size)
    if tiling.flat:
        flat = sizes[0] * sizes[1] * sizes[2]
        blocks = (1, 1, max(a, min(next_power_of_2(flat), max_elems)))
        tiles = (1, 1, cdiv(flat, blocks[2]))
        # Masked lanes of the last tile reach past the last row of dim 1 (and the flat index past the sizes).
        padded = [2 * batch, cdiv(tiles[2] * blocks[2], sizes[1] * sizes[2]), sizes[1], sizes[2]]
        flat_reach = tiles[2] * blocks[2]
    else:
        blocks = _blocks(sizes, max_elems)
        tiles = tuple(cdiv(s, b) for s, b in zip(sizes, blocks, strict=True))
        padded = [2 * batch] + [t * b for t, b in zip(tiles, blocks, strict=True)]
        flat_reach = 0
    # On the split axis the input index is start +- j with |start| < L, in masked lanes too.
    in_extents = list(padded)
    in_extents[split_dim] += length
    int64 = force_int64 or max(_span(in_extents, in_strides), _span(padded, out_strides), flat_reach) > _INT32_MAX
    num_warps = max(1, min(8, blocks[0] * blocks[1] * blocks[2] // (32 * tiling.per_thread)))
    soft_bf16 = interpreted and dtype == torch.bfloat16
    # Row quantities are passed divided by ALIGN (the kernels multiply them back; see mirror_split_kernel).
    row = [length // a, width // a] if split_dim == 3 else [length, width]
    args = (row + sizes[:2] + [sizes[2] // a] + [s // a for s in in_strides[:3]] + [in_strides[3]]
            + [s // a for s in out_strides[:3]] + [out_strides[3]] + list(tiles))
    meta = dict(SPLIT_DIM=split_dim, ALIGN=a, INT64=int64, SOFT_BF16=soft_bf16, B1=blocks[0], B2=blocks[1],
                B3=blocks[2], FLAT=tiling.flat, FLIP=tiling.flip_in_registers, num_warps=num_warps)
    programs = batch * tiles[0] * tiles[1] * tiles[2]
    if programs > _INT32_MAX:
        raise ValueError(f"tensor too large for the mirror kernels ({programs} tiles)")
    return _Plan(tuple(sizes), tuple(in_strides), tuple(out_strides), split_dim, blocks, tiles, a, int64,
                 soft_bf16, num_warps, tuple(args), meta, (programs,), tiling.split_loads_first)


def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def split(x: torch.Tensor, y: torch.Tensor, length: int, width: int, axis: int, mirror: bool,
          halve: bool, *, force_int64: bool = False) -> None:
    """Write ``mirror_split(x)`` into ``y``.

    Args:
        x: [N, C, H, W], any strides. y: [2N, C, H, P] (axis=-1) or [2N, C, P, W] (axis=-2), same dtype and
            device, any strides (written in its physical order).
        length, width: L and P of the split axis. axis: -1 or -2.
        halve: halve the overlap positions ``L-P <= j < P`` of x (the adjoint of ``reduce="mean"``).
        force_int64: use 64-bit offsets even where 32 bits suffice (tests the large-tensor path).
    """
    n = x.shape[0]
    plan = _plan(x, y, axis, n, length, width, force_int64)
    with on_device(x.device):
        mirror_split_kernel[plan.grid](
            x, y, n, *plan.args, MIRROR=bool(mirror), HALVE=bool(halve), COMPUTE=_compute_dtype(x.dtype),
            LOADS_FIRST=plan.split_loads_first, **plan.meta)


def fuse_part(part: torch.Tensor, out: torch.Tensor, length: int, width: int, axis: int, mirror: bool,
              mean: bool, *, force_int64: bool = False) -> None:
    """Write ``mirror_fuse([part])`` into ``out`` (typically a channel slice of the fused output).

    Args:
        part: [2N, C_k, H, P] (axis=-1) or [2N, C_k, P, W] (axis=-2), any strides.
        out: [N, C_k, H, L] or [N, C_k, L, W], same dtype and device, any strides.
        mean: halve the overlap (``reduce="mean"``), after rounding the sum to the dtype as the reference.
    """
    n = out.shape[0]
    plan = _plan(part, out, axis, n, length, width, force_int64)
    with on_device(part.device):
        mirror_fuse_kernel[plan.grid](
            part, out, n, *plan.args, MIRROR=bool(mirror), MEAN=bool(mean), COMPUTE=_compute_dtype(part.dtype),
            **plan.meta)
