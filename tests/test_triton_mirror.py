"""Triton mirror_split / mirror_fuse vs the reference: bit-exact forward and backward (SPEC §4).

Runs on CUDA when present, else in Triton's CPU interpreter (small shapes); ``gpu`` tests add big shapes,
the benchmark shape and the 64-bit offset path.
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from helpers import DTYPES, LAYOUTS, poison, to_layout, triton_or_skip

from cspmirror import backends, ops
from cspmirror.ops import reference
from cspmirror.ops._validate import split_width

triton_or_skip()

from cspmirror.ops import triton_mirror  # noqa: E402  (imports triton)

kernels = triton_mirror.kernels


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every output the Triton mirror ops allocate starts NaN (SPEC §4: poison outputs before a run), so an
    element a kernel never writes fails assert_bit_exact's isfinite check, whatever the allocator reuses."""
    empty = triton_mirror._empty
    monkeypatch.setattr(triton_mirror, "_empty", lambda *args: poison(empty(*args)))

KINDS = ("dense", "slice", "transposed", "expanded")
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}


# ------------------------------------------------------------------------------------------------ helpers


def sample_grid(n: int, seed: int, **factors: list) -> list[dict]:
    """``n`` cases drawn from the product of ``factors``: every level of every factor appears (about
    equally often), combined at random with a fixed seed."""
    rng = random.Random(seed)
    columns = {}
    for name, levels in factors.items():
        column = (list(levels) * math.ceil(n / len(levels)))[:n]
        rng.shuffle(column)
        columns[name] = column
    return [{name: columns[name][i] for name in factors} for i in range(n)]


def case_id(case: dict) -> str:
    return "-".join(str(v).replace("torch.", "") for v in case.values()).replace(" ", "")


def make_input(shape: list[int], dtype: torch.dtype, layout: torch.memory_format, kind: str,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf that requires grad, tensor of ``shape`` built from it): dense, a strided slice, a transposed
    view, or a stride-0 expansion."""
    n, c, h, w = shape
    if kind == "dense":
        leaf = to_layout(torch.randn(shape, device=device, dtype=dtype), layout).requires_grad_()
        return leaf, leaf
    if kind == "slice":
        leaf = to_layout(torch.randn(n + 1, c + 1, h + 2, 2 * w + 1, device=device, dtype=dtype), layout)
        leaf.requires_grad_()
        return leaf, leaf[1:, 1:, 1:h + 1, 1::2]
    if kind == "transposed":
        leaf = to_layout(torch.randn(n, c, w, h, device=device, dtype=dtype), layout).requires_grad_()
        return leaf, leaf.transpose(2, 3)
    leaf = to_layout(torch.randn(n, c, h, 1, device=device, dtype=dtype), layout).requires_grad_()
    return leaf, leaf.expand(n, c, h, w)


def poison_next_alloc(like: torch.Tensor) -> None:
    """Free a NaN block of ``like``'s size, so that the op's next ``torch.empty`` likely reuses it (the
    CUDA caching allocator, and malloc's free lists for small CPU blocks): unwritten elements then show."""
    block = poison(torch.empty_like(like, memory_format=torch.contiguous_format))
    del block


def assert_bit_exact(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """Same shape, dtype, values (``torch.equal``) and bits (signed zeros included); all finite."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{what}: {out.shape} {out.dtype} vs {ref.shape}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten element?)"
    assert torch.equal(out, ref), f"{what}: max abs diff {(out.double() - ref.double()).abs().max().item()}"
    bits = INT_VIEW[out.dtype]
    assert torch.equal(out.view(bits), ref.view(bits)), f"{what}: equal values but different bits (-0.0?)"


def split_shape(shape: list[int], axis: int, overlap: float) -> list[int]:
    out = list(shape)
    out[0] *= 2
    out[axis] = split_width(shape[axis], overlap)
    return out


# ---------------------------------------------------------------------------------------------- the grids

SPLIT_CASES = sample_grid(
    20, seed=1,
    length=[1, 2, 7, 8], other=[1, 3, 5], batch=[1, 2], channels=[1, 3], overlap=[0.0, 0.25, 1.0],
    axis=[-1, -2], mirror=[True, False], dtype=DTYPES, layout=LAYOUTS, kind=KINDS,
)

FUSE_CASES = sample_grid(
    20, seed=2,
    length=[1, 2, 7, 8], other=[1, 3, 5], batch=[1, 2], channels=[(3,), (2, 1), (1, 4, 2)],
    overlap=[0.0, 0.25, 1.0], axis=[-1, -2], mirror=[True, False], reduce=["sum", "mean"], dtype=DTYPES,
    layout=LAYOUTS, kind=KINDS,
)


def _spatial(case: dict) -> tuple[int, int]:
    """(H, W) with the split axis of length ``case["length"]``."""
    return (case["other"], case["length"]) if case["axis"] == -1 else (case["length"], case["other"])


@pytest.mark.parametrize("case", SPLIT_CASES, ids=case_id)
def test_split_matches_reference(case: dict, device: torch.device) -> None:
    shape = [case["batch"], case["channels"], *_spatial(case)]
    args = (case["overlap"], case["axis"], case["mirror"])
    leaf, x = make_input(shape, case["dtype"], case["layout"], case["kind"], device)
    ref = reference.mirror_split(x, *args)
    poison_next_alloc(ref)
    out = ops.mirror_split(x, *args, backend="triton")
    assert_bit_exact(out, ref, "forward")
    assert out.is_contiguous(memory_format=reference.memory_format_of(x))

    grad = torch.randn_like(ref)
    (ref_grad,) = torch.autograd.grad(ref, leaf, grad)
    poison_next_alloc(leaf)
    (out_grad,) = torch.autograd.grad(out, leaf, grad)
    assert_bit_exact(out_grad, ref_grad, "backward")


@pytest.mark.parametrize("case", FUSE_CASES, ids=case_id)
def test_fuse_matches_reference(case: dict, device: torch.device) -> None:
    h, w = _spatial(case)
    axis, overlap = case["axis"], case["overlap"]
    part_spatial = split_shape([1, 1, h, w], axis, overlap)[2:]
    leaves, parts = [], []
    for i, channels in enumerate(case["channels"]):
        # Mix the kinds and layouts across parts: each part is launched with its own strides.
        kind = case["kind"] if i == 0 else KINDS[i % len(KINDS)]
        layout = case["layout"] if i == 0 else LAYOUTS[(i + 1) % 2]
        leaf, part = make_input([2 * case["batch"], channels, *part_spatial], case["dtype"], layout, kind, device)
        leaves.append(leaf)
        parts.append(part)
    args = (case["length"], overlap, axis, case["mirror"], case["reduce"])
    ref = reference.mirror_fuse(parts, *args)
    poison_next_alloc(ref)
    out = ops.mirror_fuse(parts, *args, backend="triton")
    assert_bit_exact(out, ref, "forward")
    assert out.is_contiguous(memory_format=reference.fuse_memory_format(parts))

    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    out_grads = torch.autograd.grad(out, leaves, grad)
    for i, (g, r) in enumerate(zip(out_grads, ref_grads, strict=True)):
        assert_bit_exact(g, r, f"backward of parts[{i}]")


# --------------------------------------------------------------------------------- exactness corner cases


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_fuse_special_values(dtype: torch.dtype, reduce: str, device: torch.device) -> None:
    """-0.0 (becomes +0.0 outside the overlap, as in the reference's zeros + z1), subnormals, infinities,
    sums that overflow or round, and halving after rounding."""
    info = torch.finfo(dtype)
    values = torch.tensor([-0.0, 0.0, info.tiny / 4, -info.tiny / 8, info.max, info.max / 2, math.inf,
                           1.0, info.eps / 2, -1.0 - info.eps, 3.0, -7.5], dtype=dtype)
    part = values[torch.randint(len(values), (4, 3, 2, 7))]
    part[:, 0] = -0.0  # both halves -0.0 on the overlap too: (0 + -0.0) + -0.0 is +0.0
    parts = [part.to(device)]
    out = ops.mirror_fuse(parts, 12, 0.25, -1, True, reduce, backend="triton")
    ref = reference.mirror_fuse(parts, 12, 0.25, -1, True, reduce)
    assert not torch.isnan(ref).any()
    bits = INT_VIEW[dtype]
    assert torch.equal(out.view(bits), ref.view(bits))


def test_split_copies_bits(device: torch.device) -> None:
    """The split is a pure copy: -0.0 and subnormals come through unchanged."""
    x = torch.tensor([-0.0, 1e-40, -1e-45, 2.0], device=device)[torch.randint(4, (2, 2, 3, 5))]
    out = ops.mirror_split(x, 0.25, -1, True, backend="triton")
    assert torch.equal(out.view(torch.int32), reference.mirror_split(x, 0.25, -1, True).view(torch.int32))


@pytest.mark.parametrize(("shape", "overlap", "dtype"), [
    *[pytest.param((1, 2, 3, 64), 0.25, dtype, id=f"W64-{dtype}") for dtype in DTYPES],
    pytest.param((1, 1, 1, 16384), 0.25, torch.float32, id="two-tiles-along-W"),  # tiles of 8192 interpreted
])
def test_vectorised_mirrored_reads(shape: list[int], overlap: float, dtype: torch.dtype,
                                   device: torch.device) -> None:
    """NCHW, axis=-1, with L and P multiples of the vector width: the mirrored part is read in forward
    groups of ALIGN lanes flipped in registers (also across several tiles along W); split and fuse, sum and
    mean, forward and backward, bit-exact."""
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    length, width = shape[-1], split_width(shape[-1], overlap)
    y = torch.empty(split_shape(shape, -1, overlap), device=device, dtype=dtype)
    plan = kernels._plan(x, y, -1, shape[0], length, width, False)
    assert plan.split_dim == 3 and plan.align > 1, plan  # the path this test is for
    for reduce in ("sum", "mean"):
        ref = reference.mirror_split(x, overlap, -1, True)
        poison_next_alloc(ref)
        out = ops.mirror_split(x, overlap, -1, True, backend="triton")
        assert_bit_exact(out, ref, "split")
        grad = torch.randn_like(ref)
        fused_ref = reference.mirror_fuse([grad], length, overlap, -1, True, reduce)
        poison_next_alloc(fused_ref)
        assert_bit_exact(ops.mirror_fuse([grad], length, overlap, -1, True, reduce, backend="triton"), fused_ref,
                         f"fuse {reduce}")
    (ref_grad,) = torch.autograd.grad(reference.mirror_split(x, overlap, -1, True), x, grad)
    (out_grad,) = torch.autograd.grad(ops.mirror_split(x, overlap, -1, True, backend="triton"), x, grad)
    assert_bit_exact(out_grad, ref_grad, "split backward")


GPU_TILINGS = [  # every value of every knob that bench.mirror_tiles sweeps, with the defaults
    {}, {"tile_bytes": 4096}, {"tile_bytes": 16384}, {"per_thread": 8},
    {"flat": False}, {"flip_in_registers": False},
    {"flat": False, "flip_in_registers": False}, {"flip_in_registers": False, "per_thread": 8},
    {"flat": False, "split_loads_first": True}, {"split_loads_first": True},
]


@pytest.mark.parametrize("tiling", GPU_TILINGS, ids=lambda t: "-".join(f"{k}={v}" for k, v in t.items()) or "default")
@pytest.mark.parametrize(("layout", "dtype", "length"), [
    pytest.param(torch.contiguous_format, torch.float16, 64, id="nchw"),
    pytest.param(torch.channels_last, torch.float32, 40, id="nhwc"),
])
def test_gpu_tile_plans_run_bit_exact(layout: torch.memory_format, dtype: torch.dtype, length: int, tiling: dict,
                                      monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    """The tiles a GPU gets (the defaults, and the other tilings bench.mirror_tiles sweeps: tile sizes,
    elements per thread, flat tiles, element-wise mirrored reads), run here under the interpreter: several
    tiles per sample, split and fuse bit-exact; NCHW mirrored along the contiguous axis in vector groups
    (W = 64, rows of P = 40), channels_last across it. (The interpreter otherwise plans its own large tiles.)"""
    monkeypatch.setattr(kernels, "triton_interpreted", lambda: False)
    monkeypatch.setattr(kernels, "TILINGS", kernels.tilings_with(**tiling))
    x = to_layout(torch.randn(1, 32, 8, length, device=device, dtype=dtype), layout)
    length, width = x.shape[-1], split_width(x.shape[-1], 0.25)
    y = poison(to_layout(x.new_empty(2, 32, 8, width), layout))
    plan = kernels._plan(x, y, -1, 1, length, width, False)
    assert plan.grid[0] >= 2, plan  # several tiles per sample
    assert plan.align == (8 if layout == torch.contiguous_format else 4), plan  # vector groups
    kernels.split(x, y, length, width, -1, True, halve=False)
    assert_bit_exact(y, reference.mirror_split(x, 0.25, -1, True))
    out = poison(torch.empty_like(x))
    kernels.fuse_part(y, out, length, width, -1, True, mean=True)
    assert_bit_exact(out, reference.mirror_fuse([y], length, 0.25, -1, True, "mean"))


@pytest.mark.parametrize("flat", [False, True], ids=["rows", "flat"])
@pytest.mark.parametrize("force_int64", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_launchers_write_only_their_output(layout: torch.memory_format, force_int64: bool, flat: bool,
                                           monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    """Kernels launched directly into NaN-filled slices of bigger buffers: every element of the slice is
    written, nothing around it is; 64-bit offsets (forced) give the same bits; with row tiles and flat ones."""
    monkeypatch.setattr(kernels, "TILINGS", kernels.tilings_with(flat=flat))
    x = to_layout(torch.randn(3, 4, 6, 9, device=device, dtype=torch.float16), layout)
    length, width = 9, split_width(9, 0.25)
    y_buf = poison(to_layout(torch.empty(6, 6, 6, width + 2, device=device, dtype=x.dtype), layout))
    y = y_buf[:, 1:5, :, 1:width + 1]
    kernels.split(x, y, length, width, -1, True, halve=False, force_int64=force_int64)
    assert_bit_exact(y, reference.mirror_split(x, 0.25, -1, True))
    y_buf[:, 1:5, :, 1:width + 1] = 0
    assert torch.isnan(y_buf).sum() == y_buf.numel() - y.numel()

    out_buf = poison(to_layout(torch.empty(3, 7, 6, 9, device=device, dtype=x.dtype), layout))
    out = out_buf[:, 2:6]
    kernels.fuse_part(y, out, length, width, -1, True, mean=True, force_int64=force_int64)
    assert_bit_exact(out, reference.mirror_fuse([y], length, 0.25, -1, True, "mean"))
    out_buf[:, 2:6] = 0
    assert torch.isnan(out_buf).sum() == out_buf.numel() - out.numel()


# ----------------------------------------------------------------------------- op registration, compile


def test_opcheck(device: torch.device) -> None:
    x = to_layout(torch.randn(2, 3, 4, 7, device=device), torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.cspmirror.mirror_split, (x, 0.25, -1, True, "mean", True))
    a = torch.randn(4, 2, 5, 3, device=device, requires_grad=True)
    b = torch.randn(4, 1, 5, 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.cspmirror.mirror_fuse, ([a, b], 7, 0.25, -2, False, "sum", False))


def test_gradcheck_duality(device: torch.device) -> None:
    """Each op's backward is the other op, including second derivatives (fp64, fast mode)."""
    x = torch.randn(1, 2, 3, 5, device=device, dtype=torch.float64, requires_grad=True)

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        y = triton_mirror.mirror_split(x, 0.5, -1, True)
        return triton_mirror.mirror_fuse([y * y], 5, 0.5, -1, True, "mean")

    assert torch.autograd.gradcheck(roundtrip, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(roundtrip, (x,), fast_mode=True)


def _compile_backends(device: torch.device) -> list[str]:
    # Inductor on the CPU would compile C++ for the glue ops (slow, needs a compiler): aot_eager there.
    return ["aot_eager", "inductor"] if device.type == "cuda" else ["aot_eager"]


def test_compile_fullgraph(device: torch.device) -> None:
    """The public ops compile without graph breaks, forward and backward, with the same bits."""

    def model(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = ops.mirror_split(x, 0.25, -1, True, backend="triton")
        return ops.mirror_fuse([y, y * w], x.shape[-1], 0.25, -1, True, "mean", backend="triton")

    x = torch.randn(2, 3, 4, 7, device=device, requires_grad=True)
    w = torch.randn(1, 3, 1, 1, device=device)
    expected = model(x, w)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    for backend in _compile_backends(device):
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend=backend)(x, w)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        assert torch.equal(out, expected), backend
        assert torch.allclose(grad, expected_grad, rtol=1e-5, atol=1e-5), backend


# ------------------------------------------------------------------------------------------------ errors


def _bad_calls(device: torch.device) -> list[tuple[str, object]]:
    x = torch.randn(2, 3, 4, 6, device=device)
    p = torch.randn(2, 3, 4, 4, device=device)
    return [
        ("split int", lambda b: ops.mirror_split(x.long(), backend=b)),
        ("split 3-D", lambda b: ops.mirror_split(x[0], backend=b)),
        ("split list", lambda b: ops.mirror_split([x], backend=b)),
        ("split overlap", lambda b: ops.mirror_split(x, 1.5, backend=b)),
        ("split overlap type", lambda b: ops.mirror_split(x, "0.5", backend=b)),
        ("split axis", lambda b: ops.mirror_split(x, 0.25, 1, backend=b)),
        ("split axis type", lambda b: ops.mirror_split(x, 0.25, -1.0, backend=b)),
        ("fuse empty", lambda b: ops.mirror_fuse([], 6, backend=b)),
        ("fuse odd batch", lambda b: ops.mirror_fuse([p[:1]], 6, backend=b)),
        ("fuse width", lambda b: ops.mirror_fuse([p], 7, backend=b)),
        ("fuse length", lambda b: ops.mirror_fuse([p], 0, backend=b)),
        ("fuse length type", lambda b: ops.mirror_fuse([p], 6.0, backend=b)),
        ("fuse dtype", lambda b: ops.mirror_fuse([p, p.half()], 6, backend=b)),
        ("fuse shape", lambda b: ops.mirror_fuse([p, p[:, :, :3]], 6, backend=b)),
        ("fuse reduce", lambda b: ops.mirror_fuse([p], 6, reduce="max", backend=b)),
        ("fuse int", lambda b: ops.mirror_fuse([p.int()], 6, backend=b)),
    ]


def test_bad_inputs_raise_like_reference(device: torch.device) -> None:
    for name, call in _bad_calls(device):
        with pytest.raises((TypeError, ValueError)) as ref_exc:
            call("reference")
        with pytest.raises((TypeError, ValueError)) as triton_exc:
            call("triton")
        assert type(triton_exc.value) is type(ref_exc.value), name
        assert str(triton_exc.value) == str(ref_exc.value), name


def test_cpu_tensors_without_interpreter_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET"):
        triton_mirror.mirror_split(x)
    with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET"):
        triton_mirror.mirror_fuse([torch.randn(2, 2, 3, 3)], 4)
    with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.mirror_split(x, backend="triton")


# ------------------------------------------------------------------------------------------ GPU variants


def _split_then_fuse(x: torch.Tensor, axis: int, mirror: bool, reduce: str, backend: str) -> torch.Tensor:
    """split, then fuse two channel halves (one a view, one computed) back: both ops, forward and backward."""
    y = ops.mirror_split(x, 0.25, axis, mirror, backend=backend)
    half = max(1, x.shape[1] // 2)
    parts = [y[:, :half], y[:, half:] * 3] if x.shape[1] > 1 else [y]
    return ops.mirror_fuse(parts, x.shape[axis], 0.25, axis, mirror, reduce, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_big_shapes(dtype: torch.dtype, device: torch.device) -> None:
    # Few combinations: each new shape / flag combination compiles kernel variants (~0.5 s each).
    for layout, shape, (axis, mirror, reduce, kind) in (
        (torch.contiguous_format, [8, 64, 33, 65], (-1, True, "sum", "dense")),
        (torch.channels_last, [8, 64, 33, 65], (-2, True, "mean", "slice")),
        (torch.contiguous_format, [2, 1024, 4, 4], (-2, False, "mean", "transposed")),
        (torch.channels_last, [3, 48, 40, 24], (-1, False, "sum", "dense")),
    ):
        leaf, x = make_input(shape, dtype, layout, kind, device)
        what = f"{shape} axis={axis} mirror={mirror} {reduce} {kind}"
        ref = reference.mirror_split(x, 0.25, axis, mirror)
        poison_next_alloc(ref)
        assert_bit_exact(ops.mirror_split(x, 0.25, axis, mirror, backend="triton"), ref, f"split {what}")
        ref = _split_then_fuse(x, axis, mirror, reduce, "reference")
        poison_next_alloc(ref)
        out = _split_then_fuse(x, axis, mirror, reduce, "triton")
        assert_bit_exact(out, ref, f"fuse {what}")
        grad = torch.randn_like(ref)
        assert_bit_exact(torch.autograd.grad(out, leaf, grad)[0], torch.autograd.grad(ref, leaf, grad)[0],
                         f"backward {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("tiling", [{}, {"flat": False}, {"flip_in_registers": False}, {"split_loads_first": True}],
                         ids=["default", "rows", "element_wise_flip", "split_loads_first"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_benchmark_shape(layout: torch.memory_format, tiling: dict, monkeypatch: pytest.MonkeyPatch,
                             device: torch.device) -> None:
    """The benchmark shape, split and fused, bit-exact with the default tiling and the untried ones."""
    monkeypatch.setattr(kernels, "TILINGS", kernels.tilings_with(**tiling))
    x = to_layout(torch.randn(64, 256, 64, 64, device=device, dtype=torch.bfloat16), layout)
    y = ops.mirror_split(x, backend="triton")
    assert_bit_exact(y, reference.mirror_split(x))
    parts = [y[:, :128], y[:, 128:]]
    for reduce in ("sum", "mean"):
        out = ops.mirror_fuse(parts, 64, reduce=reduce, backend="triton")
        assert_bit_exact(out, reference.mirror_fuse(parts, 64, reduce=reduce))


def _flat_tile_indices(device: torch.device, t: int, sizes: tuple[int, int, int], int64: bool) -> torch.Tensor:
    """What ``_flat_tile`` computes for tile ``t`` (B3 = 1024 indices in groups of V = 4): per group, the
    indices (i1, i2, i3) of its first element and whether it is inside the sizes, as int64 [256, 4]."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, t, size1, size2, size3, B3: tl.constexpr, V: tl.constexpr, INT64: tl.constexpr):
        i1, i2, group, lane, mask = kernels._flat_tile(t, size1, size2, size3, B3, V, INT64)
        rows = tl.arange(0, B3 // V)
        tl.store(out_ptr + rows * 4, tl.reshape(i1, [B3 // V]).to(tl.int64))
        tl.store(out_ptr + rows * 4 + 1, tl.reshape(i2, [B3 // V]).to(tl.int64))
        tl.store(out_ptr + rows * 4 + 2, tl.reshape(group, [B3 // V]).to(tl.int64))
        tl.store(out_ptr + rows * 4 + 3, tl.reshape(tl.max(mask.to(tl.int64), axis=3), [B3 // V]))

    out = torch.full((256, 4), -1, dtype=torch.int64, device=device)
    probe[(1,)](out, t, *sizes, B3=1024, V=4, INT64=int64)
    return out.cpu()


@pytest.mark.parametrize("on", ["default", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("sizes", [(2**13, 2**10, 2**10), (1, 2**23, 2**10)], ids=["3d", "size1_is_1"])
def test_flat_tile_indices_past_2_to_the_31(device: torch.device, sizes: tuple[int, int, int], on: str) -> None:
    """A flat tile's indices past 2^31 elements (the 64-bit path of the launchers, whose only full test needs
    4 GB: test_gpu_int64_offsets), from a tile number that fits 32 bits; 32-bit indices would wrap here. A
    size of 1 arrives in the kernel as a plain int (specialised)."""
    t = 2**22 + 5
    flat = t * 1024 + torch.arange(256, dtype=torch.int64) * 4
    plane = sizes[1] * sizes[2]
    expected = torch.stack([flat // plane, flat % plane // sizes[2], flat % sizes[2],
                            (flat < sizes[0] * plane).long()], dim=1)
    assert flat.max() >= 2**32 and bool(expected[:, 3].all())
    device = torch.device("cuda") if on == "cuda" else device
    assert torch.equal(_flat_tile_indices(device, t, sizes, int64=True), expected)
    with warnings.catch_warnings():  # 32-bit sizes of 0 after wrapping: the interpreter warns of / 0
        warnings.simplefilter("ignore", RuntimeWarning)
        assert not torch.equal(_flat_tile_indices(device, t, sizes, int64=False), expected)  # the probe's teeth


@pytest.mark.gpu
def test_gpu_int64_offsets(device: torch.device) -> None:
    """A tensor past 2^31 elements (4.3 GB in bf16): the launchers switch to 64-bit offsets."""
    free, _ = torch.cuda.mem_get_info(device)
    if free < 40 * 2**30:
        pytest.skip("needs ~40 GB of free GPU memory")
    x = torch.randn(1, 1, 2**16, 2**15 + 8, device=device, dtype=torch.bfloat16)
    y = ops.mirror_split(x, backend="triton")
    assert y.numel() > 2**31
    ref = reference.mirror_split(x)
    assert torch.equal(y, ref)
    del ref
    out = ops.mirror_fuse([y], x.shape[-1], backend="triton")
    ref = reference.mirror_fuse([y], x.shape[-1])
    assert torch.equal(out, ref)


def _sparse_buffer(elements: int, device: torch.device) -> torch.Tensor:
    """An fp16 buffer of ``elements`` that a test touches only here and there: on the CPU its untouched pages
    are never allocated (virtual memory only); skipped where it cannot be had."""
    if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < elements * 2 + 2**30:
        pytest.skip(f"needs {elements * 2 / 2**30:.0f} GiB of free GPU memory")
    try:
        return torch.empty(elements, dtype=torch.float16, device=device)
    except RuntimeError as exc:  # e.g. a CPU without that much address space to overcommit
        pytest.skip(f"cannot reserve {elements * 2 / 2**30:.0f} GiB: {exc}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 32-bit products, had they wrapped
@pytest.mark.parametrize(("batch", "batch_stride"), [(2, 2**30), (1, 2**31)],
                         ids=["second_half_at_2_to_the_31", "batch_stride_2_to_the_31"])
def test_launchers_past_2_to_the_31_in_a_sparse_buffer(batch: int, batch_stride: int, device: torch.device) -> None:
    """The split's output and the fuse's part as views with a huge batch stride, whose second half starts
    2^31 elements in (``n_half`` times the batch stride) or whose batch stride is 2^31 itself (passed divided by
    ALIGN it fits 32 bits, multiplied back it does not): 64-bit offsets (32-bit ones wrapped, and wrote or read
    2^31 elements before the view: inside the buffer here, which starts 2^31 elements before the views). Tiny
    tensors in an 8-10 GiB buffer, of which only the rows written are ever touched."""
    length, width = 32, 20  # ALIGN = 4
    x = torch.randn(batch, 1, 1, length, dtype=torch.float16, device=device)
    buffer = _sparse_buffer(2**31 + (2 * batch - 1) * batch_stride + width, device)
    y = buffer.as_strided((2 * batch, 1, 1, width), (batch_stride, width, width, 1), 2**31)
    plan = kernels._plan(x, y, -1, batch, length, width, False)
    assert plan.int64 and plan.align == 4
    ref = reference.mirror_split(x, 0.25, -1, True)
    poison(y)
    kernels.split(x, y, length, width, -1, True, halve=False)
    assert_bit_exact(y, ref, "split")
    y.copy_(ref)
    out = poison(torch.empty_like(x))
    kernels.fuse_part(y, out, length, width, -1, True, mean=False)
    assert_bit_exact(out, reference.mirror_fuse([ref], length, 0.25, -1, True, "sum"), "fuse")


def test_plan_takes_int64_for_a_split_input_read_past_2_to_the_31() -> None:
    """The split reads x along the split axis up to L - 1, beyond the P rows of the output's tiles: x's last rows
    lie past 2^31 elements while the output's padded extent along that axis times x's stride stays below it.
    The plan must take 64-bit offsets (a bound from the output's extents alone missed it). Meta tensors: only
    the plan is worked out."""
    length, width, row_stride = 64, 32, 2**26 - 64
    x = torch.empty_strided((1, 1, length, 1), (length * row_stride, length * row_stride, row_stride, 1),
                            dtype=torch.float16, device="meta")
    y = torch.empty((2, 1, width, 1), dtype=torch.float16, device="meta")
    assert (length - 1) * row_stride > 2**31 - 1 and width * row_stride < 2**31 - 1
    assert kernels._plan(x, y, -2, 1, length, width, False).int64


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fuse_mean_of_an_overflowing_overlap(dtype, device):
    """z1 + z2 = 1.5 * max on the overlap: inf in the dtype, and inf / 2 stays inf (the reference rounds the sum
    before halving); halving first would give a finite 0.75 * max."""
    info = torch.finfo(dtype)
    part = torch.full((2, 1, 1, 7), info.max, dtype=dtype, device=device)
    part[1] = info.max / 2
    bits = torch.int16
    for reduce in ("sum", "mean"):
        out = ops.mirror_fuse([part], 12, 0.25, -1, True, reduce, backend="triton")
        ref = reference.mirror_fuse([part], 12, 0.25, -1, True, reduce)
        assert torch.isinf(ref[..., 5:7]).all() and torch.isfinite(ref[..., :5]).all()
        assert torch.equal(out.view(bits), ref.view(bits)), reduce


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mirror_ops_keep_channels_last(device, backend):
    """Outputs and gradients are channels_last when their input is (checked with plain torch, not with
    reference.memory_format_of, which both the reference and the Triton op use)."""
    cl = torch.channels_last
    x = to_layout(torch.randn(2, 3, 4, 7, device=device), cl).requires_grad_()
    y = ops.mirror_split(x, backend=backend)
    assert y.is_contiguous(memory_format=cl) and not y.is_contiguous()
    (gx,) = torch.autograd.grad(y, x, to_layout(torch.randn_like(y), cl))
    if backend == "triton":  # the gradient in the input's format (triton_mirror's contract)
        assert gx.is_contiguous(memory_format=cl) and not gx.is_contiguous()
    a = to_layout(torch.randn(4, 3, 4, 5, device=device), cl).requires_grad_()
    b = torch.randn(4, 2, 4, 5, device=device).requires_grad_()  # NCHW second part
    out = ops.mirror_fuse([a, b], 7, backend=backend)
    assert out.is_contiguous(memory_format=cl) and not out.is_contiguous()
    ga, gb = torch.autograd.grad(out, [a, b], torch.randn_like(out))
    if backend == "triton":  # each part's gradient in that part's format (triton_mirror's contract)
        assert ga.is_contiguous(memory_format=cl) and not ga.is_contiguous()
        assert gb.is_contiguous() and not gb.is_contiguous(memory_format=cl)
