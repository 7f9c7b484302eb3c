"""conv_bn_mish on the Triton backend (implicit GEMM and cuDNN + epilogue paths) vs the reference (SPEC §4)."""

import copy
import importlib.util

import pytest
import torch
from helpers import (
    DTYPES,
    LAYOUTS,
    assert_within_spec,
    poison,
    randomize_bn,
    rel_err,
    to_layout,
    triton_or_skip,
)

import cspmirror
from cspmirror import ops
from cspmirror.ops import reference

HAS_CUDA = torch.cuda.is_available()
CONV_TOL = {False: 1e-4, True: 5e-3}  # fp32 rel tolerance with tf32 off / on


@pytest.fixture(autouse=True)
def tc(monkeypatch):
    """The Triton conv module, with new outputs NaN-poisoned, exact fp32 convs and fresh caches."""
    triton_or_skip()
    from cspmirror.ops import triton_conv

    new_output = triton_conv._new_output
    monkeypatch.setattr(triton_conv, "_new_output", lambda *args: poison(new_output(*args)))
    monkeypatch.delenv(triton_conv.PATH_ENV, raising=False)
    monkeypatch.setenv(triton_conv.kernels.AUTOTUNE_ENV, "0")  # GPU: one compile per variant, except where
    # a test deletes this to autotune (the interpreter has one config anyway)
    triton_conv.clear_caches()
    with _tf32(False):
        yield triton_conv


class _tf32:
    """Context: PyTorch's cuDNN-conv TF32 flag (new fp32_precision API when this torch has it)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            self.restore = (conv, "fp32_precision", conv.fp32_precision)
            conv.fp32_precision = "tf32" if self.enabled else "ieee"
        else:
            self.restore = (torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
            torch.backends.cudnn.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        setattr(*self.restore)


def make_case(device, dtype, n=2, c_in=5, h=5, w=7, c_out=17, k=3, stride=1, residual=True,
              layout=torch.channels_last, scale=1.0, bias=True):
    """Random (x, weight, bias, stride, residual) with pre-activations of about ``scale``."""
    x = to_layout(torch.randn(n, c_in, h, w, device=device) * scale, layout).to(dtype)
    weight = (torch.randn(c_out, c_in, k, k, device=device) / (c_in * k * k) ** 0.5).to(dtype)
    b = (torch.randn(c_out, device=device) * 0.5 * scale).to(dtype) if bias else None
    shape = (n, c_out, (h - 1) // stride + 1, (w - 1) // stride + 1)
    res = to_layout(torch.randn(shape, device=device), layout).to(dtype) if residual else None
    return x, weight, b, stride, res


def references(args):
    """(float64 reference, PyTorch's own result in the inputs' dtype)."""
    double = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    return reference.conv_bn_mish(*double), reference.conv_bn_mish(*args)


def check(out, args, what, tf32=False):
    ref64, lowp = references(args)
    assert out.shape == ref64.shape and out.dtype == args[0].dtype, (what, out.dtype)
    assert_within_spec(out, ref64, lowp, CONV_TOL[tf32], what)


def run(args, **kwargs):
    return ops.conv_bn_mish(*args, backend="triton", **kwargs)


# --- correctness vs the reference -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference(device, dtype, k, stride, layout):
    args = make_case(device, dtype, k=k, stride=stride, layout=layout, residual=k == 3)
    out = run(args)
    assert out.is_contiguous(memory_format=torch.channels_last)
    check(out, args, f"{dtype} {k}x{k}/s{stride} {layout}")


@pytest.mark.parametrize("c_in,c_out,h,w", [(1, 1, 1, 1), (3, 5, 4, 3), (1, 33, 7, 9), (40, 33, 7, 9)])
@pytest.mark.parametrize("k", [1, 3])
def test_odd_shapes(device, c_in, c_out, h, w, k):
    """Channels not multiples of the blocks, C=1, 1x1 images, several row / column / channel tiles."""
    for stride in (1, 2):
        args = make_case(device, torch.float32, c_in=c_in, c_out=c_out, h=h, w=w, k=k, stride=stride,
                         bias=c_in != 3)
        check(run(args), args, f"C {c_in}->{c_out} {h}x{w} {k}x{k}/s{stride}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cudnn_path(device, dtype, layout, monkeypatch, tc):
    """The conv + Triton epilogue path, forced (F.conv2d on CPU when interpreted)."""
    monkeypatch.setenv(tc.PATH_ENV, "cudnn")
    for k, stride in ((1, 1), (3, 2)):
        args = make_case(device, dtype, k=k, stride=stride, layout=layout)
        assert tc.choose_path(*args) == "cudnn"
        check(run(args), args, f"cudnn {dtype} {k}x{k}/s{stride}")


@pytest.mark.parametrize("path", ["triton", "cudnn"])
def test_strided_bias(device, path, monkeypatch, tc):
    """A bias that is a strided view (every other element of a larger vector) is read through its strides."""
    monkeypatch.setenv(tc.PATH_ENV, path)
    x, weight, _, stride, res = make_case(device, torch.float32, c_out=6, k=1)
    bias = torch.randn(12, device=device)[::2]
    args = (x, weight, bias, stride, res)
    check(run(args), args, f"strided bias via {path}")


@pytest.mark.parametrize("path", ["triton", "cudnn"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_channel_slice(device, path, layout, monkeypatch, tc):
    """out= a channel slice of a NaN-poisoned buffer: the slice matches, nothing else is written."""
    monkeypatch.setenv(tc.PATH_ENV, path)
    args = make_case(device, torch.float32, c_out=6, stride=2, layout=layout)
    x, _, _, _, res = args
    buffer = poison(to_layout(torch.empty(2, 11, 3, 4, device=device), layout))
    out = buffer[:, 3:9]
    assert run(args, out=out) is out
    check(out, args, f"out slice via {path}")
    outside = torch.cat([buffer[:, :3], buffer[:, 9:]], dim=1)
    assert outside.isnan().all(), "wrote outside the out slice"


def test_out_aliasing_residual(device):
    """out=residual (an in-place residual add) reads every residual element before it is overwritten."""
    args = make_case(device, torch.float32, k=3)
    expected, _ = references(args)
    res = args[4]
    assert run(args, out=res) is res
    assert rel_err(res, expected) <= 1e-4


def test_dense_block_slices_without_copies(device, tc, monkeypatch):
    """The fused dense block's pattern: conv1 into the first channel half of a buffer, then conv2 reading
    that half (input and residual) into the second half. Disjoint slices: no temporary, both halves right."""
    buffer = poison(torch.empty(2, 8, 5, 7, device=device).contiguous(memory_format=torch.channels_last))
    x, w1, b1, _, _ = make_case(device, torch.float32, c_in=8, c_out=4, k=1, residual=False)
    w2, b2 = make_case(device, torch.float32, c_in=4, c_out=4, k=3)[1:3]
    temporaries = []
    new_output = tc._new_output
    monkeypatch.setattr(tc, "_new_output", lambda *a: temporaries.append(1) or new_output(*a))
    x1 = run((x, w1, b1, 1, None), out=buffer[:, :4])
    run((x1, w2, b2, 1, x1), out=buffer[:, 4:])
    assert not temporaries, "disjoint channel slices were computed aside and copied"
    want1, _ = references((x, w1, b1, 1, None))
    want2 = reference.conv_bn_mish(want1, w2.double(), b2.double(), 1, want1)
    assert rel_err(buffer[:, :4], want1) <= 1e-4 and rel_err(buffer[:, 4:], want2) <= 1e-4


def test_provably_disjoint(tc):
    """Checked against brute force: a "disjoint" verdict is never wrong; slices of a buffer are proven."""
    base = torch.arange(2 * 6 * 3 * 4).reshape(2, 6, 3, 4)
    layouts = {"nchw": base, "nhwc": base.contiguous(memory_format=torch.channels_last)}
    proven = 0
    for name, buf in layouts.items():
        views = [buf, buf[:, :3], buf[:, 3:], buf[:, 2:5], buf[..., :2, :], buf[..., 2:, :], buf[:1], buf[1:],
                 buf[:, :, :, 1:3], buf.transpose(2, 3), buf[:, :1].expand(2, 6, 3, 4)]
        for a in views:
            for b in views:
                disjoint = not set(a.flatten().tolist()) & set(b.flatten().tolist())
                verdict = tc._provably_disjoint(a, b)
                assert disjoint or not verdict, f"{name}: claimed disjoint but overlapping"
                proven += verdict
        assert tc._provably_disjoint(buf[:, :3], buf[:, 3:]), name
    assert proven >= 12


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.bfloat16, 1e4), (torch.float16, 100.0)])
def test_large_magnitude(device, dtype, scale):
    """Pre-activations of +-``scale`` (far past Mish's exp overflow): no NaN/inf, still within spec."""
    args = make_case(device, dtype, k=3, scale=scale, residual=False)
    out = run(args)
    assert torch.isfinite(out).all()
    check(out, args, f"|v|~{scale:g} {dtype}")


def test_float64(device):
    """float64 (validation accepts it) runs the conv + fp64 epilogue path."""
    args = make_case(device, torch.float64, k=3, stride=2)
    ref64, _ = references(args)
    assert rel_err(run(args), ref64) <= 1e-12


def test_weight_updated_in_place(device, tc):
    """A weight changed in place between calls is read anew, also through ``.data`` (no version bump)."""
    x, weight, b, stride, res = make_case(device, torch.float32, k=3)
    run((x, weight, b, stride, res))
    with torch.no_grad():
        weight.mul_(-1.5)
    check(run((x, weight, b, stride, res)), (x, weight, b, stride, res), "after weight.mul_")
    weight.data.mul_(0.5)
    check(run((x, weight, b, stride, res)), (x, weight, b, stride, res), "after weight.data.mul_")


def test_channels_last_weight_is_read_in_place(device, tc):
    """A dense channels_last weight is the implicit GEMM's [C_out, K] operand as it is: no copy."""
    x, weight, b, stride, res = make_case(device, torch.bfloat16, k=3)
    weight = weight.contiguous(memory_format=torch.channels_last)
    assert tc._channels_last_weight(weight).data_ptr() == weight.data_ptr()
    check(run((x, weight, b, stride, res)), (x, weight, b, stride, res), "channels_last weight")


def test_inference_mode(device, tc):
    """Under inference_mode, with a weight made there too (no version counter)."""
    with torch.inference_mode():
        args = make_case(device, torch.float32, k=3, stride=2)
        out = run(args)
    check(out, args, "inference_mode")


# --- paths, errors, autograd, registration --------------------------------------------------------------

def test_path_choice(device, monkeypatch, tc):
    args = make_case(device, torch.float32)
    if device.type == "cpu":
        assert tc.choose_path(*args) == "triton", "the interpreter must test the implicit GEMM"
    assert tc.choose_path(*args, path="cudnn") == "cudnn"
    monkeypatch.setenv(tc.PATH_ENV, "cudnn")
    assert tc.choose_path(*args) == "cudnn"
    assert tc.choose_path(*args, path="triton") == "triton", "the argument wins over the environment"
    monkeypatch.setenv(tc.PATH_ENV, "fast")
    with pytest.raises(ValueError, match=tc.PATH_ENV):
        run(args)
    with pytest.raises(ValueError, match="path"):
        tc.conv_bn_mish(*args, path="fast")


def test_tf32_follows_pytorch_conv_flag(tc):
    with _tf32(True):
        assert tc._allow_tf32()
    with _tf32(False):
        assert not tc._allow_tf32()


def test_gpu_config_pruning(monkeypatch):
    """The Hopper candidates (never pruned under the interpreter, which has one config): 3x3 never gets
    more than 4 warps, big layers keep a real choice, tiny layers keep a small config, fp32 drops the
    configs whose buffers would not fit in shared memory."""
    from cspmirror.kernels import conv as kc

    def pruned(k, m, c_in, c_out, precision="tf32", dtype=torch.bfloat16):
        return kc._prune_configs(kc._GPU_CONFIGS, {"M": m, "C_in": c_in, "C_out": c_out,
                                                   "x_ptr": torch.empty(0, dtype=dtype)},
                                 K_SIZE=k, PRECISION=precision)

    monkeypatch.delenv(kc.AUTOTUNE_ENV)
    big3, big1 = pruned(3, 32 * 64 * 64, 256, 256), pruned(1, 32 * 64 * 64, 256, 256)
    assert len(big3) >= 3 and all(c.num_warps <= 4 for c in big3)
    assert any(c.num_warps == 8 for c in big1)
    # 128x256x64 tiles in 3 stages: 144 KiB in bf16, 288 KiB in fp32 (sm_90 allows 227 KiB)
    big1_fp32 = pruned(1, 32 * 64 * 64, 256, 256, dtype=torch.float32)
    assert big1_fp32 and all(kc._shared_bytes(c, 4) <= 227 * 1024 for c in big1_fp32)
    assert len(big1_fp32) < len(big1) and max(kc._shared_bytes(c, 2) for c in big1) > 227 * 1024 / 2
    exact = pruned(3, 32 * 64 * 64, 256, 256, "ieee")
    assert exact and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 for c in exact)
    monkeypatch.setenv(kc.AUTOTUNE_ENV, "0")
    assert pruned(3, 32 * 64 * 64, 256, 256) == big3[:1]
    for k in (1, 3):
        tiny = pruned(k, 1, 3, 1)
        assert len(tiny) == 1 and tiny[0].num_warps <= 4 and tiny[0].kwargs["BLOCK_N"] == 32
    for c in kc._GPU_CONFIGS:
        assert all(v >= 16 and v & (v - 1) == 0 for k, v in c.kwargs.items() if k.startswith("BLOCK"))


def test_autotune_key_holds_what_pruning_reads():
    """A config the autotuner found for a key is reused, unpruned, by every later call with that key: the key
    must hold every argument :func:`_prune_configs` reads (Triton adds the tensors' dtypes itself). Without
    PRECISION, an fp32 layer tuned with TF32 on handed its big tile to the same layer with TF32 off ("ieee",
    FMA units, which the pruning keeps to small tiles), and a layer tuned exact handed its small tile to TF32."""
    import inspect
    import re

    from cspmirror.kernels import conv as kc

    read = set(re.findall(r'\bargs\["(\w+)"\]', inspect.getsource(kc._prune_configs))) - {"x_ptr"}
    assert {"K_SIZE", "M", "C_in", "C_out", "PRECISION"} <= read
    assert read <= set(kc._conv_mish_kernel.keys)


@pytest.mark.parametrize("bad", ["stride", "kernel", "dtype", "channels", "residual", "out", "bias"])
def test_bad_input_same_error_as_reference(device, bad):
    x, weight, b, stride, res = make_case(device, torch.float32)
    kwargs = {}
    if bad == "stride":
        stride = 3
    elif bad == "kernel":
        weight = torch.randn(17, 5, 5, 5, device=device)
    elif bad == "dtype":
        weight = weight.half()
    elif bad == "channels":
        x = x[:, :4]
    elif bad == "residual":
        res = res[:, :, :-1]
    elif bad == "out":
        kwargs["out"] = torch.empty(2, 17, 5, 7, device=device, dtype=torch.float16)
    elif bad == "bias":
        b = b[:-1]
    errors = []
    for backend in ("reference", "triton"):
        with pytest.raises((ValueError, TypeError)) as info:
            ops.conv_bn_mish(x, weight, b, stride, res, backend=backend, **kwargs)
        errors.append((info.type, str(info.value)))
    assert errors[0] == errors[1]


def test_autograd_matches_reference(device):
    x, weight, b, stride, res = make_case(device, torch.float32, k=3, stride=2)
    grads = []
    for backend in ("reference", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, b, res)]
        y = ops.conv_bn_mish(leaves[0], leaves[1], leaves[2], stride, leaves[3], backend=backend)
        y.backward(torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape))
        grads.append([t.grad for t in leaves])
    for name, want, got in zip(("x", "weight", "bias", "residual"), *grads, strict=True):
        assert rel_err(got, want) <= 1e-5, name


def test_out_with_grad_matches_reference(device):
    """``out=`` a channel slice of a buffer in the graph, with inputs that need grad: the same gradients as the
    reference backend (the functional op, then a copy that autograd records)."""
    x, weight, b, stride, res = make_case(device, torch.float32)
    grads = []
    for backend in ("reference", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, b, res)]
        base = torch.zeros(res.shape[0], res.shape[1] + 3, *res.shape[2:], device=device, requires_grad=True)
        buffer = base * 1.0
        ops.conv_bn_mish(*leaves[:3], stride, leaves[3], out=buffer[:, 3:], backend=backend)
        buffer.backward(torch.linspace(-1, 1, buffer.numel(), device=device).reshape(buffer.shape))
        grads.append([t.grad for t in (*leaves, base)])
    for name, want, got in zip(("x", "weight", "bias", "residual", "buffer"), *grads, strict=True):
        assert rel_err(got, want) <= 1e-5, name


def test_opcheck(device):
    x, weight, b, stride, res = make_case(device, torch.float32, n=1, c_in=3, h=3, w=4, c_out=4, k=3)
    torch.library.opcheck(torch.ops.cspmirror.conv_bn_mish.default,
                          (x, weight.requires_grad_(), b, stride, res, "auto"))
    torch.library.opcheck(torch.ops.cspmirror.conv_bn_mish_out.default,
                          (x, weight.detach(), None, 2, None, torch.empty(1, 4, 2, 2, device=device), "auto"))


def test_compile_fullgraph(device):
    """Both ops (functional and out=) inside one torch.compile(fullgraph=True) graph."""
    x, weight, b, _, res = make_case(device, torch.float32, k=3)
    w2 = make_case(device, torch.float32, c_in=17, c_out=4, k=1)[1]

    def f(x, weight, b, res, w2):
        y = ops.conv_bn_mish(x, weight, b, 1, res, backend="triton")
        buffer = torch.zeros(y.shape[0], 6, y.shape[2], y.shape[3], device=y.device)
        ops.conv_bn_mish(y, w2, None, 1, out=buffer[:, 1:5], backend="triton")
        return buffer

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    with torch.no_grad():
        want, got = f(x, weight, b, res, w2), compiled(x, weight, b, res, w2)
    assert rel_err(got, want) <= 1e-6


# --- the whole model ---------------------------------------------------------------------------------------


def test_fused_tiny_model(device, monkeypatch, tc):
    """cspmirrornet_tiny, eval, fused on backend="triton": every conv runs the implicit GEMM; logits match."""
    model = cspmirror.cspmirrornet_tiny(num_classes=10).to(device).eval()
    randomize_bn(model)
    unfused = cspmirror.set_backend(copy.deepcopy(model), "reference")  # the oracle: never "auto" (Triton on CUDA)
    cspmirror.fuse_for_inference(model, backend="triton")
    if importlib.util.find_spec("cspmirror.ops.triton_mirror") is None:  # not built yet: isolate the conv
        for m in model.modules():
            if isinstance(m, (cspmirror.MirrorSplit, cspmirror.MirrorFuse)):
                m.backend = "reference"
    calls, run_gemm = [], tc._RUNNERS["triton"]

    def counted(*args):
        calls.append(args[0].shape)
        return run_gemm(*args)

    monkeypatch.setitem(tc._RUNNERS, "triton", counted)
    x = torch.randn(1, 3, 16, 16, device=device)
    with torch.no_grad():
        want, got = unfused(x), model(x)
    n_convs = sum(isinstance(m, cspmirror.ConvBNMish) for m in model.modules())
    assert len(calls) == n_convs
    assert rel_err(got, want) <= 1e-4


# --- GPU: realistic shapes -----------------------------------------------------------------------------------

GPU_SHAPES = [  # (n, c_in, h, w, c_out, k, stride)
    (32, 256, 32, 32, 256, 3, 1),
    (32, 128, 64, 64, 256, 3, 2),
    (32, 256, 32, 32, 128, 1, 1),
    (64, 512, 8, 5, 1024, 1, 1),
    (32, 3, 64, 64, 32, 3, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["triton", "cudnn"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_realistic(device, path, shape, monkeypatch, tc):
    """Layer shapes of cspmirrornet53 (batch 32) in bf16, both paths forced, autotuned."""
    monkeypatch.setenv(tc.PATH_ENV, path)
    monkeypatch.delenv(tc.kernels.AUTOTUNE_ENV)
    n, c_in, h, w, c_out, k, stride = shape
    args = make_case(device, torch.bfloat16, n=n, c_in=c_in, h=h, w=w, c_out=c_out, k=k, stride=stride)
    check(run(args), args, f"{path} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("k,stride", [(3, 1), (1, 1)])
def test_gpu_dtypes(device, dtype, k, stride, monkeypatch, tc):
    monkeypatch.setenv(tc.PATH_ENV, "triton")
    args = make_case(device, dtype, n=16, c_in=128, h=32, w=32, c_out=128, k=k, stride=stride)
    check(run(args), args, f"{dtype} {k}x{k}")


@pytest.mark.gpu
def test_gpu_auto_path(device, monkeypatch, tc):
    """path="auto" times both paths once per shape, caches the winner, and the winner is right."""
    monkeypatch.delenv(tc.kernels.AUTOTUNE_ENV)
    args = make_case(device, torch.bfloat16, n=32, c_in=128, h=32, w=32, c_out=128, k=3)
    check(run(args), args, "auto")
    assert len(tc._PATH_CHOICES) == 1
    assert tc.choose_path(*args) in ("triton", "cudnn")
    check(run(args), args, "auto, cached")
    assert len(tc._PATH_CHOICES) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["triton", "cudnn"])
def test_gpu_tf32(device, path, monkeypatch, tc):
    """With PyTorch's conv TF32 on, fp32 follows it (SPEC §4: rel <= 5e-3)."""
    monkeypatch.setenv(tc.PATH_ENV, path)
    args = make_case(device, torch.float32, n=8, c_in=256, h=32, w=32, c_out=256, k=3)
    with _tf32(True):
        out = run(args)
    check(out, args, f"tf32 {path}", tf32=True)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["triton", "cudnn"])
def test_gpu_out_slice_nchw(device, path, monkeypatch, tc):
    """Realistic out= slice of an NCHW buffer (strided stores), bf16, with a residual."""
    monkeypatch.setenv(tc.PATH_ENV, path)
    args = make_case(device, torch.bfloat16, n=16, c_in=128, h=32, w=32, c_out=128, k=3,
                     layout=torch.contiguous_format)
    buffer = poison(torch.empty(16, 256, 32, 32, device=device, dtype=torch.bfloat16))
    run(args, out=buffer[:, 64:192])
    check(buffer[:, 64:192], args, f"out slice {path}")
    assert buffer[:, :64].isnan().all() and buffer[:, 192:].isnan().all()


@pytest.mark.gpu
def test_gpu_int64_offsets(device, monkeypatch, tc):
    """x and out past 2^31 elements: the far end of the output is right (int64 offsets)."""
    monkeypatch.setenv(tc.PATH_ENV, "triton")
    n, c, h, w = 1, 8, 16384, 16400
    assert n * c * h * w > 2**31
    x = torch.randn(n, c, h, w, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(8, c, 3, 3, device=device) / 8).to(torch.bfloat16)
    out = ops.conv_bn_mish(x, weight, None, 1, backend="triton")
    tail = x[:, :, -6:]  # the last 5 output rows need the last 6 input rows (3x3, padding 1)
    args = (tail, weight, None, 1, None)
    ref64, lowp = references(args)
    assert_within_spec(out[:, :, -5:], ref64[:, :, -5:], lowp[:, :, -5:], 1e-4, "tail rows")


@pytest.mark.parametrize("k", [1, 3])
def test_conv_out_aliasing_input(device, k):
    """out=x (an in-place layer): several output-channel and pixel tiles read x while others write it; the
    result must be that of a separate output."""
    x = torch.randn(2, 40, 5, 7, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(40, 40, k, k, device=device) / (40 * k * k) ** 0.5
    b = torch.randn(40, device=device) * 0.5
    expected = reference.conv_bn_mish(x.double(), w.double(), b.double())
    with torch.no_grad():
        assert ops.conv_bn_mish(x, w, b, out=x, backend="triton") is x
    assert rel_err(x, expected) <= 1e-4


def test_provably_disjoint_at_the_radix_boundary(tc):
    """Rows of 5 at a stride of 4 (unfold): the inner span equals the outer stride, offsets no longer decompose
    uniquely, and a[..., 0, 4] is b[..., 1, 0]; the proof must not claim these views disjoint."""
    rows = torch.arange(40.0).unfold(0, 5, 4)[None, None]  # [1, 1, 9, 5], strides (.., .., 4, 1)
    a, b = rows[:, :, 0:1, :], rows[:, :, 1:2, 0:1]
    assert set(a.flatten().tolist()) & set(b.flatten().tolist())
    assert not tc._provably_disjoint(a, b)
