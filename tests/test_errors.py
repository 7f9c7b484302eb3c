"""Bad input raises a clear error naming the argument, the same on every backend."""

from __future__ import annotations

import pytest
import torch

import cspmirror
from cspmirror import ops
from cspmirror.backends import BackendUnavailableError, resolve
from cspmirror.devices import parse_device

BACKENDS = ["reference", "triton", "extension", "auto"]

x4 = torch.randn(2, 3, 4, 6)


SPLIT_CASES = [
    (dict(x=torch.randn(3, 4, 5)), ValueError, "x must be a 4-D"),
    (dict(x=torch.randint(0, 3, (1, 2, 3, 4))), TypeError, "x must be float"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randn(1, 0, 2, 2)), ValueError, "x must have every dimension"),
    (dict(x=x4, overlap=-0.1), ValueError, r"overlap must be in \[0, 1\]"),
    (dict(x=x4, overlap=1.01), ValueError, r"overlap must be in \[0, 1\]"),
    (dict(x=x4, overlap="0.2"), TypeError, "overlap must be a number"),
    (dict(x=x4, axis=1), ValueError, "axis must be -1"),
    (dict(x=x4, axis=0.5), TypeError, "axis must be an int"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,exc,match", SPLIT_CASES)
def test_split_errors(backend, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.mirror_split(**kwargs, backend=backend)


def _parts(length=6, overlap=0.25, channels=(3, 2), n=2):
    width = ops.mirror_split(torch.zeros(1, 1, 1, length), overlap).shape[-1]
    return [torch.randn(2 * n, c, 4, width) for c in channels]


FUSE_CASES = [
    (dict(parts=[]), TypeError, "parts must be a non-empty list"),
    (dict(parts=[torch.randn(3, 2, 4, 4)]), ValueError, "even batch"),
    (dict(parts=[torch.randn(4, 2, 4, 5)]), ValueError, r"parts\[0\] has size 5 on axis -1"),
    (dict(parts=_parts()[:1] + [torch.randn(4, 2, 5, 4)]), ValueError, r"parts\[1\] has shape"),
    (dict(parts=_parts()[:1] + [torch.randn(2, 2, 4, 4)]), ValueError, r"parts\[1\] has shape"),  # batch only
    (dict(parts=_parts()[:1] + [torch.randn(4, 2, 4, 4).half()]), TypeError, r"parts\[1\] has dtype"),
    (dict(parts=_parts()[:1] + [torch.randn(4, 2, 4, 4, device="meta")]), ValueError, r"parts\[1\] is on meta"),
    (dict(parts=_parts(), reduce="max"), ValueError, "reduce must be one of"),
    (dict(parts=_parts(), length=0), ValueError, "length must be >= 1"),
    (dict(parts=_parts(), length=6.0), TypeError, "length must be an int"),
    (dict(parts=_parts(), overlap=2.0), ValueError, "overlap must be in"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,exc,match", FUSE_CASES)
def test_fuse_errors(backend, kwargs, exc, match):
    kwargs = {"length": 6, **kwargs}
    with pytest.raises(exc, match=match):
        ops.mirror_fuse(**kwargs, backend=backend)


def _bn_args(c=3, **over):
    args = dict(x=torch.randn(2, c, 3, 3), weight=torch.ones(c), bias=torch.zeros(c),
                running_mean=torch.zeros(c), running_var=torch.ones(c), training=True)
    args.update(over)
    return args


BN_CASES = [
    (_bn_args(x=torch.randn(2, 3, 3)), ValueError, "x must be a 4-D"),
    (_bn_args(weight=torch.ones(4)), ValueError, "weight must have 3 elements"),
    (_bn_args(weight=torch.ones(3, device="meta")), ValueError, "weight is on meta"),
    (_bn_args(running_var=None), ValueError, "running_mean and running_var"),
    (_bn_args(running_mean=None, running_var=None, training=False), ValueError, "training=False needs"),
    (_bn_args(momentum=1.5), ValueError, "momentum must be"),
    (_bn_args(eps=0.0), ValueError, "eps must be a positive"),
    (_bn_args(eps=float("nan")), ValueError, "eps must be a positive"),
    (_bn_args(weight=torch.ones(3).half()), TypeError, "weight has dtype torch.float16 but x has dtype torch.float32"),
    (_bn_args(bias=torch.zeros(3).double()), TypeError, "bias has dtype torch.float64 but weight has dtype"),
    (_bn_args(x=torch.randn(2, 3, 3, 3).bfloat16(), weight=torch.ones(3).half(), bias=torch.zeros(3).half()),
     TypeError, "weight has dtype torch.float16 but x has dtype torch.bfloat16"),
    (_bn_args(x=torch.randn(2, 3, 3, 3).bfloat16(), weight=torch.ones(3).bfloat16(), bias=None), TypeError,
     "running_mean has dtype torch.float32 but weight has dtype torch.bfloat16"),
    (_bn_args(x=torch.randn(1, 3, 1, 1)), ValueError, "Expected more than 1 value per channel"),
    (_bn_args(residual=torch.randn(2, 3, 3, 4)), ValueError, "residual must have shape"),
    (_bn_args(residual=torch.randn(2, 3, 3, 3).double()), TypeError, "residual has dtype"),
    (_bn_args(out=torch.empty(2, 3, 3, 2)), ValueError, "out must have shape"),
    (_bn_args(out=torch.empty(2, 3, 3, 1).expand(2, 3, 3, 3)), ValueError, "out has a dimension of stride 0"),
    (_bn_args(running_mean=torch.zeros(3, requires_grad=True)), ValueError, "running_mean must not require grad"),
    (_bn_args(running_var=torch.ones(3, requires_grad=True), training=False), ValueError,
     "running_var must not require grad"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,exc,match", BN_CASES)
def test_bn_mish_errors(backend, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.bn_mish(**kwargs, backend=backend)


def test_bn_degenerate_error_is_pytorchs():
    """N*H*W == 1 in training raises exactly what torch.nn.functional.batch_norm raises."""
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError) as theirs:
        torch.nn.functional.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError) as ours:
        ops.bn_mish(x, None, None, None, None, True)
    assert str(ours.value) == str(theirs.value)


CONV_CASES = [
    (dict(weight=torch.randn(4, 3, 5, 5)), ValueError, "weight must be a 1x1 or 3x3"),
    (dict(weight=torch.randn(4, 2, 3, 3)), ValueError, "weight expects 2 input channels"),
    (dict(weight=torch.randn(4, 3, 3, 3).half()), TypeError, "weight has dtype"),
    (dict(bias=torch.randn(5)), ValueError, "bias must have 4 elements"),
    (dict(bias=torch.randn(4).half()), TypeError, "bias has dtype torch.float16 but x has dtype torch.float32"),
    (dict(out=torch.empty(2, 4, 2, 1).expand(2, 4, 2, 3)), ValueError, "out has a dimension of stride 0"),
    (dict(stride=3), ValueError, "stride must be 1 or 2"),
    (dict(stride=True), ValueError, "stride must be 1 or 2"),
    (dict(residual=torch.randn(2, 4, 4, 6)), ValueError, r"residual must have shape \(2, 4, 2, 3\)"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,exc,match", CONV_CASES)
def test_conv_bn_mish_errors(backend, kwargs, exc, match):
    args = {**dict(x=x4, weight=torch.randn(4, 3, 3, 3), bias=torch.randn(4), stride=2), **kwargs}
    with pytest.raises(exc, match=match):
        ops.conv_bn_mish(**args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["bn_mish", "conv_bn_mish"])
def test_out_leaf_that_requires_grad_is_refused(backend, op):
    """Writing into a leaf that requires grad is autograd's error, on every backend (none writes it silently)."""
    if op == "bn_mish":
        args = _bn_args()
        out = torch.empty_like(args["x"]).requires_grad_()
        call = lambda: ops.bn_mish(**args, out=out, backend=backend)  # noqa: E731
    else:
        out = torch.empty(2, 4, 2, 3, requires_grad=True)
        call = lambda: ops.conv_bn_mish(x4, torch.randn(4, 3, 3, 3), None, 2, out=out, backend=backend)  # noqa: E731
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["bn_mish", "conv_bn_mish"])
def test_out_inference_tensor_outside_inference_mode_is_refused(backend, op):
    """out= made under torch.inference_mode cannot be written outside it: PyTorch's error on every backend (the
    fast kernels wrote it silently); inside inference mode it is written."""
    shape = (2, 3, 3, 3) if op == "bn_mish" else (2, 4, 2, 3)
    with torch.inference_mode():
        out = torch.zeros(shape)
    if op == "bn_mish":
        call = lambda: ops.bn_mish(**_bn_args(), out=out, backend=backend)  # noqa: E731
    else:
        call = lambda: ops.conv_bn_mish(x4, torch.randn(4, 3, 3, 3), None, 2, out=out, backend=backend)  # noqa: E731
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        call()
    assert not out.any()
    with torch.inference_mode():
        assert call() is out and out.any()


def test_plain_fx_tracing_points_to_the_fx_integration():
    """torch.fx without cspmirror's leaves reaches an op with a Proxy: the error says where the tracer is."""
    with pytest.raises(TypeError, match="got Proxy; to trace a model with torch.fx, use cspmirror.integrations.fx"):
        torch.fx.symbolic_trace(cspmirror.cspmirrornet_tiny())


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.mirror_split(x4, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        cspmirror.set_backend(cspmirror.cspmirrornet_tiny(), "fast")


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1|cannot be imported"):
        resolve("triton", torch.device("cpu"))
    assert resolve("auto", torch.device("cpu")) == "reference"


def test_model_input_errors():
    model = cspmirror.cspmirrornet_tiny()
    with pytest.raises(ValueError, match="x must be a 4-D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="MishedDenseBlock needs an even channel count"):
        cspmirror.MishedDenseBlock(5)


def test_bad_input_never_reaches_a_backend(monkeypatch):
    """Every bad input above is refused by the shared validation in cspmirror.ops, before a backend is looked
    up: the reason the errors are the same on every backend (the backend parametrization above cannot tell
    backends apart, since none of them is ever called)."""
    def unreachable(op, backend, device):
        raise AssertionError(f"{op} reached backend {backend!r} with an invalid argument")

    monkeypatch.setattr(ops, "implementation", unreachable)
    for kwargs, exc, match in SPLIT_CASES:
        with pytest.raises(exc, match=match):
            ops.mirror_split(**kwargs, backend="triton")
    for kwargs, exc, match in FUSE_CASES:
        with pytest.raises(exc, match=match):
            ops.mirror_fuse(**{"length": 6, **kwargs}, backend="triton")
    for kwargs, exc, match in BN_CASES:
        with pytest.raises(exc, match=match):
            ops.bn_mish(**kwargs, backend="triton")
    for kwargs, exc, match in CONV_CASES:
        args = {**dict(x=x4, weight=torch.randn(4, 3, 3, 3), bias=torch.randn(4), stride=2), **kwargs}
        with pytest.raises(exc, match=match):
            ops.conv_bn_mish(**args, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "extension"])
def test_error_backends_are_live(backend):
    """The backends the error tests are parametrized over do run a valid call here (else those cases only
    exercise the shared validation)."""
    try:
        y = ops.mirror_split(x4, backend=backend)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    assert torch.equal(y, ops.mirror_split(x4, backend="reference"))


@pytest.mark.parametrize("value", ["foo", "CUDA", "cuda:x", "cuda:-1", "meta", "mps"])
def test_device_flag_refuses_other_strings(value):
    """One parser for every --device: meta (which runs no kernels: train's was a traceback from autocast) and
    other device types are refused like a misspelling."""
    with pytest.raises(ValueError, match=rf"^argument --device: expected auto, cpu, cuda or cuda:N, got '{value}'$"):
        parse_device(value)


def test_device_flag_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_device(None) == parse_device("auto") == parse_device("cpu") == torch.device("cpu")
    for value in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"argument --device: '{value}' asked for CUDA, but no CUDA device"):
            parse_device(value)


def test_device_flag_cuda_index(monkeypatch):
    """A bare cuda (or auto) is this process's LOCAL_RANK's device; an index must be one of the machine's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda:1") == parse_device("cuda", local_rank=1) == parse_device(None, local_rank=1)
    assert parse_device("cuda:1") == torch.device("cuda", 1) and parse_device("auto") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"'cuda:2' asked for CUDA device 2, but this machine has 2 \(cuda:0 to"):
        parse_device("cuda:2")
    with pytest.raises(ValueError, match="'cuda' asked for LOCAL_RANK 2's CUDA device, but this machine has 2"):
        parse_device("cuda", local_rank=2)
