"""bn_mish on the Triton backend vs the reference (SPEC §4): forward and every gradient, running statistics,
eval mode, ``out=`` into channel slices, large magnitudes, error parity, determinism, opcheck, torch.compile.

Every comparison draws fresh inputs and runs on NaN-poisoned outputs and scratch buffers. Interpreter shapes
are tiny (and the tile size is shrunk where many tiles must be exercised); the GPU tests at the end use
realistic sizes.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bn_cases import LOW, check_bn_case, make_case, run
from helpers import DTYPES, LAYOUTS, poison, randomize_bn, rel_err, to_layout, triton_or_skip

import cspmirror
from cspmirror import ops
from cspmirror.layers import BatchNormMish2d, MishedDenseBlock

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    """The kernel module, with every new output and scratch buffer NaN-poisoned."""
    triton_or_skip()
    from cspmirror.kernels import bn_mish as kernels

    from cspmirror.ops import triton_bn_mish

    new_like, new_fp32 = triton_bn_mish.new_like, kernels.new_fp32
    monkeypatch.setattr(triton_bn_mish, "new_like", lambda x: poison(new_like(x)))
    monkeypatch.setattr(kernels, "new_fp32", lambda *shape, device: poison(new_fp32(*shape, device=device)))
    return kernels


@pytest.fixture
def small_tiles(kernels, monkeypatch):
    """Tiles of 16 elements (2 channels when channels are innermost), about 8 programs per pass and one
    channel block per group of the pipelined training passes, so that tiny shapes span several tiles per
    channel (the last one partial), several channel blocks and groups, and reduction programs whose tiles
    cross from one sample to the next."""
    monkeypatch.setattr(kernels, "TILE", 16)
    monkeypatch.setattr(kernels, "BLOCK_C_CONTIGUOUS", 2)
    monkeypatch.setattr(kernels, "target_programs", lambda device: 8)
    monkeypatch.setenv(kernels.GROUP_BYTES_ENV, "1")


# --- cases ---------------------------------------------------------------------------------------------------

check_case = functools.partial(check_bn_case, backend="triton")


SHAPES = [  # (shape, with residual)
    ((2, 3, 5, 7), True),
    ((3, 1, 2, 3), False),  # C = 1
    ((4, 5, 1, 1), True),  # H = W = 1
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,residual", SHAPES, ids=str)
def test_matches_reference(device, shape, residual, dtype, layout, training):
    case = make_case(shape, dtype, layout, device, training=training, residual=residual)
    got = check_case(case)
    dense = case.x.is_contiguous() or case.x.is_contiguous(memory_format=torch.channels_last)
    if dense:  # outputs keep the input's layout
        assert got["y"].stride() == case.x.stride() and got["dx"].stride() == case.x.stride()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fp32_parameters_with_low_precision_input(device, dtype, training):
    """BatchNorm parameters and statistics stay fp32 under autocast / mixed precision."""
    case = make_case((2, 4, 3, 5), dtype, torch.channels_last, device, training=training,
                     param_dtype=torch.float32)
    got = check_case(case)
    assert got["dweight"].dtype == got["dbias"].dtype == got["running_mean"].dtype == torch.float32


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_without_affine_or_running_stats(device, training):
    check_case(make_case((2, 3, 4, 5), device=device, affine=False, running=not training, training=training))


@pytest.mark.parametrize("dtype,layout,training", [
    (torch.float32, torch.contiguous_format, True),
    (torch.float32, torch.channels_last, True),
    (torch.float32, torch.contiguous_format, False),
    (torch.bfloat16, torch.channels_last, False),
], ids=str)
def test_many_tiles_and_programs(small_tiles, kernels, device, dtype, layout, training):
    case = make_case((2, 3, 3, 7), dtype, layout, device, training=training)
    plan = kernels.make_plan(case.x)
    assert plan.nbb > 1 and plan.c_blocks > 1 and plan.splits(8)[0] > 1
    assert len(kernels.pipeline(plan, case.x.device, 4).launches) == plan.c_blocks + 1
    check_case(case)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_merge_steps_over_many_programs(kernels, monkeypatch, device, layout, training):
    """More reduction programs per channel block than one merge step takes partials (MERGE_ROWS), the last
    step partial, around a large mean: each partial counted once, in the parallel-variance merge and in the
    sums of the backward passes (training, and eval's in the same launch as its dx)."""
    monkeypatch.setattr(kernels, "TILE", 8)
    monkeypatch.setattr(kernels, "BLOCK_C_CONTIGUOUS", 2)
    monkeypatch.setattr(kernels, "MERGE_ROWS", 8)
    monkeypatch.setattr(kernels, "target_programs", lambda device: 96)
    case = make_case((5, 3, 6, 7), torch.float32, layout, device, training=training, loc=1e3, scale=3.0)
    splits = kernels.make_plan(case.x).splits(96)[0]
    assert splits > kernels.MERGE_ROWS and splits % kernels.MERGE_ROWS
    check_case(case)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_weight_and_bias_gradients_alone(device, small_tiles, training):
    """x needs no gradient (a frozen layer before it): the backward only reduces, over several channel
    blocks and reduction programs, the last program of each block adding up its partials."""
    case = make_case((3, 5, 4, 3), device=device, training=training, residual=False)

    def gradients(backend: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        weight, bias = (t.detach().to(dtype).requires_grad_() for t in (case.weight, case.bias))
        running = [t.detach().to(dtype) for t in (case.running_mean, case.running_var)]
        y = ops.bn_mish(case.x.detach().to(dtype), weight, bias, *running, training, backend=backend)
        return torch.autograd.grad(y, [weight, bias], case.grad.to(dtype))

    for got, expected in zip(gradients("triton", torch.float32), gradients("reference", torch.float64),
                             strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_odd_strides(device):
    """Views that fit no [A, C, B] walk (H and W do not merge) are copied; an odd-strided out gets a copy."""
    case = make_case((2, 3, 5, 4), device=device)
    case.x = case.x.transpose(2, 3).contiguous().transpose(2, 3)
    case.residual = case.residual[:, :, :, :]
    got = check_case(case)
    out = poison(torch.empty(2, 3, 4, 5, device=device)).transpose(2, 3)
    with torch.no_grad():
        y = ops.bn_mish(case.x, case.weight, case.bias, None, None, True, residual=case.residual, out=out,
                        backend="triton")
    assert y is out
    torch.testing.assert_close(out, got["y"].detach(), rtol=0, atol=0)


def test_float64_runs_the_reference(device):
    check_case(make_case((2, 3, 4, 5), torch.float64, device=device))


# --- out= ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_channel_slice(device, dtype, layout, grad):
    """out= a channel slice (at an odd offset) of a NaN buffer: exactly the slice is written."""
    case = make_case((2, 3, 4, 5), dtype, layout, device)
    expected = run(case, "triton")
    buf = poison(to_layout(torch.empty(2, 8, 4, 5, dtype=dtype, device=device), layout))
    out = buf[:, 3:6]
    if grad:
        got = run(case, "triton", out=out)
        assert got["y"] is out
        for name in ("dx", "dweight", "dbias", "dresidual"):
            torch.testing.assert_close(got[name], expected[name])  # dy arrives as a copy: another walk
    else:
        with torch.no_grad():
            y = ops.bn_mish(case.x, case.weight, case.bias, case.running_mean.clone(),
                            case.running_var.clone(), True, residual=case.residual, out=out, backend="triton")
        assert y is out
    torch.testing.assert_close(out, expected["y"].detach(), rtol=0, atol=0)
    outside = torch.cat([buf[:, :3], buf[:, 6:]], dim=1)
    assert outside.isnan().all(), "bn_mish wrote outside its channel slice"


def test_out_may_alias_x_or_sit_beside_the_residual(device):
    """In place (out=x) and out / residual as two slices of one buffer are computed directly."""
    case = make_case((2, 4, 3, 5), device=device, training=False)
    expected = run(case, "triton")["y"].detach()
    buf = torch.randn(2, 8, 3, 5, device=device)
    buf[:, 4:] = case.residual
    with torch.no_grad():
        ops.bn_mish(case.x, case.weight, case.bias, case.running_mean, case.running_var, False,
                    residual=buf[:, 4:], out=buf[:, :4], backend="triton")
        x = case.x.clone()
        ops.bn_mish(x, case.weight, case.bias, case.running_mean, case.running_var, False,
                    residual=case.residual, out=x, backend="triton")
    torch.testing.assert_close(buf[:, :4], expected, rtol=0, atol=0)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_dense_block_without_autograd_writes_slices(device, backend, layout):
    """MishedDenseBlock without autograd writes x1 and x1 + x2 into channel slices of one buffer (no cat):
    same result as the autograd path (cat), in training and in eval mode."""
    block = cspmirror.set_backend(MishedDenseBlock(6).to(device), backend)
    x = to_layout(torch.randn(2, 6, 5, 4, device=device), layout)
    for training in (True, False):
        block.train(training)
        with torch.no_grad():
            y_slices = block(x)
        y_cat = block(x)
        assert y_cat.requires_grad and not y_slices.requires_grad
        torch.testing.assert_close(y_slices, y_cat.detach(), rtol=1e-6, atol=1e-6)


# --- the pipelined training passes ------------------------------------------------------------------------------

@pytest.mark.parametrize("reversed_,hints", [(True, False), (False, True)], ids=["default", "in_order_hints"])
@pytest.mark.parametrize("dtype,group_blocks", [(torch.float32, 1), (torch.float32, 2), (torch.float16, 1),
                                                (torch.bfloat16, 1)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_channel_groups(small_tiles, kernels, monkeypatch, device, layout, dtype, group_blocks, reversed_, hints):
    """Training passes pipelined over channel groups (the last one smaller): output, every gradient and the
    running statistics as the reference; in place (out=x) and into a channel slice bit for bit as the
    functional result. Also with the second pass walking forwards and the L2 eviction hints on."""
    monkeypatch.setattr(kernels, "SECOND_PASS_REVERSED", reversed_)
    monkeypatch.setattr(kernels, "L2_HINTS", {"forward": hints, "backward": hints})
    case = make_case((2, 5, 3, 7), dtype, layout, device)
    plan = kernels.make_plan(case.x)
    # group_blocks channel blocks in backward (x and dy), twice that in forward
    monkeypatch.setenv(kernels.GROUP_BYTES_ENV, str(group_blocks * plan.block_elements * 2 * case.x.element_size()))
    backward_groups = len(kernels.pipeline(plan, case.x.device, 2 * case.x.element_size()).launches) - 1
    assert backward_groups == -(-plan.c_blocks // group_blocks) > 1
    expected = check_case(case)["y"].detach()
    x = case.x.clone()
    part = poison(to_layout(torch.empty(2, 8, 3, 7, dtype=dtype, device=device), layout))[:, 2:7]
    with torch.no_grad():
        for source, out in ((x, x), (case.x, part)):  # in place, then into a channel slice
            ops.bn_mish(source, case.weight, case.bias, None, None, True, residual=case.residual, out=out,
                        backend="triton")
            torch.testing.assert_close(out, expected, rtol=0, atol=0)


# --- BatchNorm semantics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_running_stats_follow_batchnorm2d(device, momentum, layout):
    """BatchNormMish2d (triton) vs nn.BatchNorm2d + Mish over several steps, then in eval mode."""
    fused = BatchNormMish2d(5, momentum=momentum).to(device)
    fused.backend = "triton"
    plain = nn.BatchNorm2d(5, momentum=momentum).to(device)
    with torch.no_grad():
        for bn in (fused, plain):
            bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
            bn.bias.copy_(torch.linspace(-0.2, 0.3, 5))
    for _ in range(3):
        x = to_layout(torch.randn(3, 5, 4, 3, device=device) * 3 + 1, layout)
        torch.testing.assert_close(fused(x), F.mish(plain(x)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.running_mean, plain.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fused.running_var, plain.running_var, rtol=1e-6, atol=1e-7)
        assert fused.num_batches_tracked.item() == plain.num_batches_tracked.item()
    fused.eval()
    plain.eval()
    x = to_layout(torch.randn(2, 5, 3, 3, device=device), layout)
    torch.testing.assert_close(fused(x), F.mish(plain(x)), rtol=1e-5, atol=1e-6)
    assert set(fused.state_dict()) == set(plain.state_dict())


def test_low_precision_module_keeps_its_dtype(device):
    """A .to(bf16) BatchNormMish2d keeps bf16 running stats, updated as nn.BatchNorm2d's (within rounding)."""
    fused, plain = BatchNormMish2d(4).to(device).bfloat16(), nn.BatchNorm2d(4).to(device).bfloat16()
    fused.backend = "triton"
    for _ in range(3):
        x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16, device=device) * 2 + 1
        fused(x), plain(x)
    assert fused.running_var.dtype == torch.bfloat16
    torch.testing.assert_close(fused.running_mean, plain.running_mean, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fused.running_var, plain.running_var, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("with_out", [False, True], ids=["functional", "out"])
def test_running_update_in_the_forward_launch(device, kernels, small_tiles, with_out):
    """Plain eager training forwards update the running statistics in their own launch, strided running
    buffers in a launch after it, the registered ops (what compile and dispatch modes run) in an op of their
    own: the same values bit for bit, over several channel blocks and reduction programs. Every launch leaves
    the channel blocks' counters at zero for the next one."""
    check_running_update(kernels, make_case((3, 5, 4, 3), device=device), with_out)


def check_running_update(kernels, case, with_out: bool) -> None:
    from cspmirror.ops import triton_bn_mish

    momentum, c, device = 0.3, case.x.shape[1], case.x.device
    results = {}
    for variant in ("fused", "strided", "registered ops"):
        running = [torch.zeros(2 * c, device=device)[::2], torch.ones(2 * c, device=device)[::2]]
        if variant != "strided":
            running = [t.contiguous() for t in running]
        for _ in range(2):
            if variant == "registered ops":
                y = triton_bn_mish._train_and_update_ops(case.x, case.weight, case.bias, None, 1e-5, *running,
                                                         momentum)[0]
            else:
                y = ops.bn_mish(case.x, case.weight, case.bias, *running, True, momentum,
                                out=torch.empty_like(case.x) if with_out else None, backend="triton")
        results[variant] = [y, *running]
        assert all(int(counters.abs().sum()) == 0 for counters in kernels._COUNTERS.values())
    for variant in ("strided", "registered ops"):
        for got, expected in zip(results[variant], results["fused"], strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    expected = nn.BatchNorm2d(c, momentum=momentum).to(device)
    for _ in range(2):
        expected(case.x.float())
    torch.testing.assert_close(results["fused"][1], expected.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["fused"][2], expected.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_one_value_per_channel_errors_like_pytorch(device, backend):
    x = torch.randn(1, 3, 1, 1, device=device)
    with pytest.raises(ValueError) as expected:
        F.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError) as got:
        ops.bn_mish(x, None, None, None, None, True, backend=backend)
    assert str(got.value) == str(expected.value)
    # Eval mode is elementwise: one value per channel is fine.
    zeros = torch.zeros(3, device=device)
    y = ops.bn_mish(x, None, None, zeros, zeros + 1, False, backend=backend)
    torch.testing.assert_close(y, F.mish(x / (1 + 1e-5) ** 0.5))


@pytest.mark.parametrize("bad", ["weight_size", "residual_dtype", "out_shape", "momentum"])
def test_bad_input_raises_as_on_the_reference(device, bad):
    x = torch.randn(2, 3, 4, 4, device=device)
    kwargs = dict(weight=torch.ones(3, device=device), residual=None, out=None, momentum=0.1)
    kwargs.update({
        "weight_size": {"weight": torch.ones(4, device=device)},
        "residual_dtype": {"residual": torch.randn(2, 3, 4, 4, dtype=torch.float16, device=device)},
        "out_shape": {"out": torch.empty(2, 3, 4, 5, device=device)},
        "momentum": {"momentum": 1.5},
    }[bad])
    errors = []
    for backend in ("triton", "reference"):
        with pytest.raises((ValueError, TypeError)) as info:
            ops.bn_mish(x, kwargs["weight"], None, None, None, True, kwargs["momentum"],
                        residual=kwargs["residual"], out=kwargs["out"], backend=backend)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


# --- numerics --------------------------------------------------------------------------------------------------

def test_large_magnitudes_give_no_nan(device):
    """Mish and its derivative at |v| up to 1e4 (eval: v = x), and a training batch of scale 1e4."""
    values = torch.tensor([1e4, -1e4, 1e3, -1e3, 88.0, -88.0, 30.0, -30.0, 20.5, -20.5, 20.0, -20.0, 19.9, 0.0,
                           -0.3, -1.19, 1e-3, -104.0, 120.0, -5e3])
    x = values.reshape(1, 1, 4, 5).repeat(2, 3, 1, 1).to(device)
    case = make_case(x.shape, device=device, training=False, residual=False)
    case.x = x
    case.weight, case.bias = torch.ones(3, device=device), torch.zeros(3, device=device)
    case.running_mean, case.running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    case.eps = 1e-12  # rstd = 1 exactly in fp32: v = x
    got = check_case(case)
    assert all(torch.isfinite(t).all() for t in got.values())
    assert got["y"][0, 0, 0, 0].item() == 1e4 and got["y"][0, 0, 0, 1].item() == 0.0
    case = make_case((2, 3, 4, 5), device=device, scale=1e4, loc=-3e3, training=True)
    case.weight = torch.tensor([1e4, -1e4, 1.0], device=device)
    got = check_case(case)
    assert all(torch.isfinite(t).all() for t in got.values())


@pytest.mark.parametrize("tiles", ["default", "small"])
def test_statistics_are_stable_for_a_large_mean(request, device, tiles):
    """Mean 1e4, std 1 (and std 1e-2): fp32 sums of x and x^2 would lose the variance entirely (relative
    error 6 and 1e5 here); the shifted sums, merged around one shift, keep it to ~1e-7."""
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    for std in (1.0, 1e-2):
        x = (torch.randn(4, 3, 6, 7, dtype=torch.float64, device=device) * std + 1e4).float()
        assert (request.getfixturevalue("kernels").make_plan(x).block_b == 16) == (tiles == "small")
        _, mean, var = torch.ops.cspmirror.bn_mish_train_triton(x, None, None, None, 1e-5)
        var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
        assert rel_err(var, var64) <= 1e-6
        assert rel_err(mean, mean64) <= 1e-7


def test_output_is_accurate_for_a_large_mean(device):
    """Mean 1e4, std 100: the output within SPEC (the fp32 rounding of the mean, 5e-4, is 5e-6 of std)."""
    check_case(make_case((4, 3, 6, 7), device=device, loc=1e4, scale=100.0))


def test_many_values_per_channel(kernels, monkeypatch, device):
    """~9k values per channel with a mean of 1e3; several full-size tiles per reduction program."""
    monkeypatch.setattr(kernels, "target_programs", lambda device: 2)
    case = make_case((2, 2, 48, 96), device=device, loc=1e3, scale=3.0, residual=False)
    assert kernels.make_plan(case.x).splits(2)[1] > 1
    check_case(case)


def test_idx64_path(kernels, monkeypatch, device):
    """The int64 offset path (taken for tensors past 2^31 elements), forced on a small tensor."""
    monkeypatch.setattr(kernels, "INT32_LIMIT", 16)
    plan = kernels.make_plan(torch.empty(2, 3, 4, 5))
    assert plan.idx64
    for layout in LAYOUTS:
        check_case(make_case((2, 3, 4, 5), layout=layout, device=device))


def _tile_probe(kernels, device: torch.device, item: int, nbb: int, b: int, idx64: bool) -> list[int]:
    """What ``_tile`` gives for tile ``item`` of a channel of ``b`` elements (BLOCK_B = 4096): its first and
    last offsets along B and how many are inside B; and ``_count`` of the tiles [item - 1, nbb)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, item, nbb, B, BLOCK_B: tl.constexpr, IDX64: tl.constexpr):
        _, _, offs, mask = cspmirror.kernels.bn_mish._tile(item, nbb, 1, B, 0, 1, BLOCK_B, IDX64)
        offs = tl.reshape(offs, [BLOCK_B]).to(tl.int64)
        tl.store(out_ptr, tl.min(offs, axis=0))
        tl.store(out_ptr + 1, tl.max(offs, axis=0))
        tl.store(out_ptr + 2, tl.sum(tl.reshape(mask, [BLOCK_B]).to(tl.int64), axis=0))
        tl.store(out_ptr + 3, cspmirror.kernels.bn_mish._count(item - 1, nbb, nbb, B, BLOCK_B).to(tl.int64))

    out = torch.full((4,), -1, dtype=torch.int64, device=device)
    probe[(1,)](out, item, nbb, b, BLOCK_B=4096, IDX64=idx64)
    return out.tolist()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the 32-bit probe, on purpose
@pytest.mark.parametrize("on", ["default", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tile_offsets_past_2_to_the_31(kernels, device, on):
    """One channel of more than 2^31 elements along B (e.g. C = 1, whose N, H and W merge into B): the tile
    offsets and the count of valid elements in 64 bits from the tile number on (32-bit products wrapped
    negative: reads and writes before the tensor, and a wrong count in the statistics). The 64-bit path's
    only full test needs 4 GiB (test_gpu_c1_past_2_to_the_31_elements)."""
    item = 2**19 + 5  # the last tile; it starts at 2^31 + 20480 and lacks 100 elements
    nbb = item + 1
    b = nbb * 4096 - 100
    device = torch.device("cuda") if on == "cuda" else device
    assert _tile_probe(kernels, device, item, nbb, b, idx64=True) == [item * 4096, item * 4096 + 4095, 3996,
                                                                      8092]
    assert _tile_probe(kernels, device, item, nbb, b, idx64=False)[0] < 0  # the probe's teeth: 32 bits wrap


def test_launch_grids_stay_within_cuda_limits(kernels, monkeypatch):
    """More than 65535 channel blocks (one channel per block with tiles of 2): every launch's grid fits CUDA's
    limits (x < 2^31 programs, y and z <= 65535), which the interpreter does not enforce. The eval kernels had
    the channel blocks along y: on a GPU, eval forward and backward of e.g. [1, 2^18, 32, 32] NCHW did not
    launch. The kernels are not run here (the grids are recorded); the interpreter tests run the same
    program numbering on small shapes."""
    monkeypatch.setattr(kernels, "TILE", 2)
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    for name in ("_apply_kernel", "_backward_kernel", "_train_forward_kernel", "_train_backward_kernel"):
        monkeypatch.setattr(kernels, name, Recorder())
    c = 2**16 + 1
    x, stats = torch.randn(1, c, 1, 2), torch.ones(c)
    assert kernels.make_plan(x).c_blocks == c
    kernels.apply(x, stats, stats, 1e-5, None, None, None, torch.empty_like(x))
    kernels.train_forward(x, None, None, None, 1e-5, torch.empty_like(x))
    for training, dx in ((False, torch.empty_like(x)), (True, torch.empty_like(x)), (True, None)):
        kernels.backward(x, x, stats, stats, 1e-5, None, None, training, dx, True)
    assert len(grids) >= 5
    assert all(g[0] < 2**31 and all(d <= 65535 for d in g[1:]) for g in grids), grids


def test_deterministic(kernels, device):
    case = make_case((2, 3, 4, 7), device=device)
    assert kernels.make_plan(case.x).splits(kernels.target_programs(case.x.device))[0] == 2
    first, second = run(case, "triton"), run(case, "triton")
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_saves_only_input_and_statistics(device):
    """Autograd keeps x, mean and var (and the parameters), not the normalized or activated tensors."""
    case = make_case((2, 3, 4, 5), device=device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = case.x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.bn_mish(x, case.weight, case.bias, None, None, True, residual=case.residual, backend="triton")
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert sorted(t.numel() for t in saved if t.numel() != x.numel()) == [3, 3, 3, 3]  # w, b, mean, var


# --- torch.library / torch.compile ------------------------------------------------------------------------------

def _opcheck_samples(device):
    case = make_case((2, 3, 4, 5), device=device)
    x, w, b, res = case.x, case.weight, case.bias, case.residual
    mean, var = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)[::-1]
    grad = case.grad
    ops_ns = torch.ops.cspmirror
    # The running-statistics, out= and backward ops have no autograd by design (they are called on detached
    # inputs, without grad, and from the backward): they skip opcheck's autograd tests.
    no_autograd = ("test_schema", "test_faketensor")
    slice_of = torch.empty(2, 6, 4, 5, device=device)[:, 1:4]
    return [
        (ops_ns.bn_mish_train_triton, (x.clone().requires_grad_(), w.clone().requires_grad_(), b, res, 1e-5),
         None),
        (ops_ns.bn_mish_train_triton, (x.clone().requires_grad_(), None, None, None, 1e-5), None),
        (ops_ns.bn_mish_train_triton_out, (x, w, b, res, 1e-5, case.running_mean.clone(), case.running_var.clone(),
                                           0.1, slice_of.clone()), no_autograd),
        (ops_ns.bn_mish_train_triton_out, (x, None, None, None, 1e-5, None, None, 0.1, slice_of.clone()),
         no_autograd),
        (ops_ns.bn_running_update_triton, (mean, var, case.running_mean, case.running_var, 0.1, 40), no_autograd),
        (ops_ns.bn_mish_apply_triton, (x.clone().requires_grad_(), mean, var, w.clone().requires_grad_(), b, res,
                                       1e-5, True), None),
        (ops_ns.bn_mish_apply_triton, (x.clone().requires_grad_(), mean, var, None, None, None, 1e-5, False),
         None),
        (ops_ns.bn_mish_apply_triton_out, (x, mean, var, w, b, res, 1e-5, True, slice_of), no_autograd),
        (ops_ns.bn_mish_backward_triton, (grad, x, mean, var, w, b, 1e-5, True, True, True), no_autograd),
        (ops_ns.bn_mish_backward_triton, (grad, x, mean, var, None, None, 1e-5, False, True, False), no_autograd),
    ]


@pytest.mark.parametrize("index", range(10))
def test_opcheck(device, index):
    op, args, test_utils = _opcheck_samples(device)[index]
    if test_utils is None:
        torch.library.opcheck(op, args)
    else:
        torch.library.opcheck(op, args, test_utils=test_utils)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph(device, training):
    """torch.compile(fullgraph=True) forward and backward, running stats included (backend "aot_eager" on
    the CPU: the interpreter runs the kernels inside; inductor's CPU codegen is not what is tested)."""
    case = make_case((2, 3, 4, 5), device=device, training=training)

    def fn(x, w, b, rm, rv, res):
        return ops.bn_mish(x, w, b, rm, rv, training, 0.1, 1e-5, res, backend="triton")

    expected = run(case, "triton")  # also warms the op look-up cache, which compile needs
    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    leaves = [t.detach().clone().requires_grad_() for t in (case.x, case.weight, case.bias, case.residual)]
    rm, rv = case.running_mean.clone(), case.running_var.clone()
    y = compiled(leaves[0], leaves[1], leaves[2], rm, rv, leaves[3])
    grads = torch.autograd.grad(y, leaves, case.grad)
    torch.testing.assert_close(y, expected["y"], rtol=0, atol=0)
    for g, name in zip(grads, ("dx", "dweight", "dbias", "dresidual"), strict=True):
        torch.testing.assert_close(g, expected[name], rtol=0, atol=0)
    torch.testing.assert_close(rm, expected["running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(rv, expected["running_var"], rtol=0, atol=0)


# --- GPU, realistic sizes -----------------------------------------------------------------------------------------

GPU_CASES = (  # (shape, dtype, layout, training)
    [((32, 256, 64, 64), dtype, layout, training)
     for dtype in DTYPES for layout in LAYOUTS for training in (True, False)]
    + [(shape, dtype, layout, training)
       for shape in [(8, 64, 56, 56), (16, 1024, 7, 7), (64, 3, 33, 17)]
       for dtype, layout, training in [(torch.float32, torch.contiguous_format, True),
                                       (torch.bfloat16, torch.channels_last, True),
                                       (torch.float16, torch.contiguous_format, False)]]
    # eval with few channels: more than 16 partial rows per channel for the eval weight and bias sums, whose
    # loop Triton 3.6 once miscompiled (kernels/bn_mish.py, _column_sums)
    + [((64, 3, 33, 17), torch.float32, torch.contiguous_format, False),
       ((64, 3, 33, 17), torch.bfloat16, torch.channels_last, False)]
)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype,layout,training", GPU_CASES, ids=str)
def test_gpu_matches_reference(shape, dtype, layout, training):
    case = make_case(shape, dtype, layout, "cuda", training=training,
                     param_dtype=torch.float32 if dtype == torch.bfloat16 else None)
    check_case(case)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_gpu_running_update_and_counters(kernels, layout):
    """The running statistics updated in the forward's launch, and the counters left at zero, on the GPU."""
    check_running_update(kernels, make_case((32, 128, 32, 32), torch.bfloat16, layout, "cuda",
                                            param_dtype=torch.float32), with_out=False)


@pytest.mark.gpu
def test_gpu_training_forward_in_a_cuda_graph(kernels):
    """Captured into a CUDA graph, the training forward uses counters of its own (zeroed by the graph);
    replays compute what eager calls do, running statistics included, and eager calls after it still work."""
    case = make_case((16, 64, 16, 16), torch.bfloat16, torch.channels_last, "cuda", residual=False,
                     param_dtype=torch.float32)
    x, w, b = (t.detach() for t in (case.x, case.weight, case.bias))
    running = [case.running_mean.clone(), case.running_var.clone()]
    expected_running = [case.running_mean.clone(), case.running_var.clone()]
    with torch.no_grad():
        expected = [ops.bn_mish(x, w, b, *expected_running, True, backend="triton") for _ in range(2)]
        ops.bn_mish(x, w, b, *[t.clone() for t in running], True, backend="triton")  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            y = ops.bn_mish(x, w, b, *running, True, backend="triton")
        torch.cuda.current_stream().wait_stream(stream)
        for step in range(2):
            graph.replay()
            torch.testing.assert_close(y, expected[step], rtol=0, atol=0)
        torch.testing.assert_close(running, expected_running, rtol=0, atol=0)
        again = ops.bn_mish(x, w, b, *[t.clone() for t in running], True, backend="triton")
    torch.testing.assert_close(again, expected[0], rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_large_mean_many_values():
    """1M values per channel with mean 1e4, std 100."""
    check_case(make_case((256, 8, 64, 64), device="cuda", loc=1e4, scale=100.0, residual=False))


@pytest.mark.gpu
@pytest.mark.parametrize("group_bytes", [None, "1"], ids=["default_groups", "one_block_per_group"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_gpu_out_slice_and_determinism(kernels, monkeypatch, layout, group_bytes):
    if group_bytes is not None:
        monkeypatch.setenv(kernels.GROUP_BYTES_ENV, group_bytes)
    case = make_case((32, 128, 32, 32), torch.bfloat16, layout, "cuda")
    if group_bytes is not None:
        check_case(case)
    first, second = run(case, "triton"), run(case, "triton")
    for name in first:
        assert torch.equal(first[name], second[name]), name
    buf = poison(to_layout(torch.empty(32, 384, 32, 32, dtype=torch.bfloat16, device="cuda"), layout))
    with torch.no_grad():
        ops.bn_mish(case.x, case.weight, case.bias, case.running_mean.clone(), case.running_var.clone(), True,
                    residual=case.residual, out=buf[:, 128:256], backend="triton")
    assert torch.equal(buf[:, 128:256], first["y"].detach())
    assert buf[:, :128].isnan().all() and buf[:, 256:].isnan().all()


@pytest.mark.gpu
@pytest.mark.parametrize("knob", ["in_order", "hints_flipped"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_gpu_second_pass_knobs(kernels, monkeypatch, layout, knob):
    """The knobs bench.bn_groups sweeps, off their defaults, over several groups: still as the reference;
    the walk in order also bit for bit as the defaults (the reductions keep their order whatever the walk).
    The eviction hints change the compiled code beyond the loads: on an H200 (Triton 3.6) dx then differed
    from the defaults' while within SPEC section 4."""
    monkeypatch.setenv(kernels.GROUP_BYTES_ENV, str(2**20))
    case = make_case((32, 128, 32, 32), torch.bfloat16, layout, "cuda")
    default = run(case, "triton")
    if knob == "in_order":
        monkeypatch.setattr(kernels, "SECOND_PASS_REVERSED", not kernels.SECOND_PASS_REVERSED)
    else:
        monkeypatch.setattr(kernels, "L2_HINTS", {name: not on for name, on in kernels.L2_HINTS.items()})
    check_case(case)
    if knob == "in_order":
        for name, value in run(case, "triton").items():
            assert torch.equal(value, default[name]), name


@pytest.mark.gpu
def test_gpu_past_2_to_the_31_elements():
    """2.1e9 elements (int64 offsets): statistics vs torch and y at the far end vs the formula."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    x = torch.randn(1, 2, 32768, 32769, dtype=torch.bfloat16, device="cuda")
    y = ops.bn_mish(x, None, None, None, None, True, backend="triton")
    for c in range(2):
        var, mean = torch.var_mean(x[0, c].float(), unbiased=False)
        tail = x[0, c, -1, -64:].float()
        expected = F.mish((tail - mean) / torch.sqrt(var + 1e-5))
        torch.testing.assert_close(y[0, c, -1, -64:].float(), expected, rtol=1e-2, atol=1e-2)
    del x, y
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_c1_past_2_to_the_31_elements(kernels):
    """One channel of 2^31 + 2^19 elements (4.3 GB in bf16), whose N, H and W merge into one axis B past 2^31
    (see test_tile_offsets_past_2_to_the_31): training statistics vs torch, the running mean, and y at both
    ends vs the formula, in training and in eval."""
    free, _ = torch.cuda.mem_get_info()
    if free < 32 * 2**30:
        pytest.skip("needs 32 GiB of free GPU memory")
    x = torch.randn(2, 1, 2**15, 2**15 + 8, dtype=torch.bfloat16, device="cuda")
    assert kernels.make_plan(x).b > 2**31
    running_mean, running_var = torch.zeros(1, device="cuda"), torch.ones(1, device="cuda")
    y = ops.bn_mish(x, None, None, running_mean, running_var, True, backend="triton")
    var, mean = torch.var_mean(x.float(), unbiased=False)
    torch.testing.assert_close(running_mean, 0.1 * mean.reshape(1), rtol=1e-4, atol=1e-6)
    for training in (True, False):
        if not training:
            y = ops.bn_mish(x, None, None, mean.reshape(1), var.reshape(1), False, backend="triton")
        for n, h, w in ((0, 0, slice(0, 64)), (-1, -1, slice(-64, None))):  # the first and the last elements
            expected = F.mish((x[n, 0, h, w].float() - mean) / torch.sqrt(var + 1e-5))
            torch.testing.assert_close(y[n, 0, h, w].float(), expected, rtol=1e-2, atol=1e-2)
    del x, y
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_compile_inductor():
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), BatchNormMish2d(32)).cuda()
    model[1].backend = "triton"
    x = torch.randn(8, 16, 32, 32, device="cuda")
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_mish_eps_inside_the_square_root(device, training):
    """rstd = 1 / sqrt(var + eps) as nn.BatchNorm2d: with small variances and a larger eps, 1 / (sqrt(var) + eps)
    or any other placement is far outside SPEC section 4 (the default cases, var ~ 4 and eps = 1e-5, differ by
    ~4e-6 only)."""
    case = make_case((2, 3, 4, 5), device=device, training=training, scale=0.05, loc=0.0)
    case.eps = 1e-3
    check_bn_case(case, backend="triton")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bn_mish_low_precision_output_is_correctly_rounded(device, dtype, training):
    """The kernels compute in fp32 (error ~1e-6) and round once: nearly every fp16 / bf16 output is the float64
    reference rounded to nearest. A truncating store (or double rounding) stays within SPEC's "2x PyTorch's
    error" but matches only about half of them."""
    case = make_case((4, 3, 16, 16), dtype, device=device, training=training, residual=False,
                     param_dtype=torch.float32)
    rm, rv = case.running_mean.clone(), case.running_var.clone()
    with torch.no_grad():
        out = ops.bn_mish(case.x, case.weight, case.bias, rm, rv, training, backend="triton")
        ref = ops.bn_mish(case.x.double(), case.weight.double(), case.bias.double(), case.running_mean.double(),
                          case.running_var.double(), training, backend="reference")
    exact = (out == ref.to(dtype)).double().mean().item()
    assert exact >= 0.97, f"only {exact:.1%} of the outputs are the reference rounded to nearest"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_mish_out_overlapping_x_shifted(device, kernels, small_tiles, training):
    """out = buf[:, 1:5] over x = buf[:, 0:4] (one channel apart), several channel blocks: each channel must be
    read before another channel block overwrites it, as if out were a separate tensor."""
    buf = torch.randn(2, 5, 3, 5, device=device)
    x = buf[:, 0:4]
    w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    assert kernels.make_plan(x).c_blocks > 1
    expected = ops.bn_mish(x.clone(), w, b, rm.clone(), rv.clone(), training, backend="reference")
    with torch.no_grad():
        ops.bn_mish(x, w, b, rm.clone(), rv.clone(), training, out=buf[:, 1:5], backend="triton")
    torch.testing.assert_close(buf[:, 1:5], expected, rtol=1e-5, atol=1e-6)


def test_bn_mish_out_keeps_the_residual_gradient(device):
    """A frozen BN (eval, parameters without grad) on an input without grad, residual trainable, out= given: the
    residual still gets its gradient (the out= fast path without autograd must not be taken)."""
    x = torch.randn(2, 3, 4, 5, device=device)
    w, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    residual = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    out = torch.empty(2, 3, 4, 5, device=device)
    y = ops.bn_mish(x, w, b, rm, rv, False, residual=residual, out=out, backend="triton")
    assert y.requires_grad
    grad = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, residual, grad)
    torch.testing.assert_close(got, grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_untracked_bn_mish_in_eval_uses_batch_statistics(device, backend):
    """As nn.BatchNorm2d(track_running_stats=False): no running statistics, so eval mode normalizes with the
    batch's own statistics (no error)."""
    fused = BatchNormMish2d(4, track_running_stats=False).to(device).eval()
    fused.backend = backend
    plain = nn.BatchNorm2d(4, track_running_stats=False).to(device).eval()
    x = torch.randn(2, 4, 3, 5, device=device) * 2 + 1
    torch.testing.assert_close(fused(x), F.mish(plain(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dense_block_is_spec_1_3(device, backend):
    """out = x + cat([x1, x1 + x2]) with x1 = mish(bn1(conv1x1(x))), x2 = mish(bn2(conv3x3(x1))), written with
    F.conv2d / F.batch_norm / F.mish from the block's own parameters: forward and every gradient (the
    backends are otherwise only compared with each other, which a change in layers.py cannot fail)."""
    block = cspmirror.set_backend(randomize_bn(MishedDenseBlock(4)).to(device), backend).train()
    c1, c2 = block.conv1, block.conv2
    stats = [t.clone() for t in (c1.bn.running_mean, c1.bn.running_var, c2.bn.running_mean, c2.bn.running_var)]
    x = torch.randn(2, 4, 5, 6, device=device, requires_grad=True)

    def spec(x):
        x1 = F.mish(F.batch_norm(F.conv2d(x, c1.conv.weight), stats[0], stats[1], c1.bn.weight, c1.bn.bias, True))
        x2 = F.mish(F.batch_norm(F.conv2d(x1, c2.conv.weight, padding=1), stats[2], stats[3], c2.bn.weight,
                                 c2.bn.bias, True))
        return x + torch.cat([x1, x1 + x2], dim=1)

    y, expected = block(x), spec(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    wrt = [x, *block.parameters()]
    for got, want in zip(torch.autograd.grad(y, wrt, grad), torch.autograd.grad(expected, wrt, grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
