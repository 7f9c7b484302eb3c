"""Triton launches on the current CUDA device, not on its tensors': every launcher makes it theirs."""

from __future__ import annotations

import contextlib

import torch
from helpers import triton_or_skip

from cspmirror import ops

triton_or_skip()

import cspmirror.kernels.bn_mish  # noqa: E402  (imports triton)
import cspmirror.kernels.conv  # noqa: E402
import cspmirror.kernels.mirror  # noqa: E402
from cspmirror.kernels import launch  # noqa: E402

MODULES = (cspmirror.kernels.mirror, cspmirror.kernels.bn_mish, cspmirror.kernels.conv)


def test_on_device_is_a_no_op_off_cuda():
    assert isinstance(launch.on_device(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_names_its_tensors_device(monkeypatch, device):
    seen: dict[str, list[torch.device]] = {m.__name__: [] for m in MODULES}
    for module in MODULES:
        def recorded(dev, name=module.__name__):
            seen[name].append(dev)
            return launch.on_device(dev)
        monkeypatch.setattr(module, "on_device", recorded)
    x = torch.randn(2, 4, 5, 6, device=device, requires_grad=True)
    y = ops.mirror_fuse([ops.mirror_split(x, backend="triton")], 6, backend="triton")
    w = torch.rand(4, device=device, requires_grad=True)
    z = ops.bn_mish(y, w, None, torch.zeros(4, device=device), torch.ones(4, device=device), True,
                    backend="triton")
    z = ops.conv_bn_mish(z, torch.randn(3, 4, 3, 3, device=device), torch.randn(3, device=device), 1,
                         backend="triton")
    z.sum().backward()
    with torch.no_grad():
        ops.bn_mish(y, w, None, torch.zeros(4, device=device), torch.ones(4, device=device), False,
                    backend="triton")
    for name, devices in seen.items():
        assert devices, f"{name} launched without choosing the device"
        assert all(d == x.device for d in devices), (name, devices)


def test_conv_path_timing_runs_on_the_tensors_device(monkeypatch, device):
    """The conv's per-shape path choice times both paths with ``do_bench``, whose events, synchronizations and
    L2 flush are the current CUDA device's: it must be the tensors' device (for a tensor on cuda:1 while
    cuda:0 was current, the events timed cuda:0's idle stream, and the cached choice was arbitrary)."""
    import triton.testing

    from cspmirror.ops import triton_conv

    entered: list[torch.device] = []
    timed_in: list[list[torch.device]] = []

    @contextlib.contextmanager
    def recorded(dev):
        entered.append(dev)
        try:
            with launch.on_device(dev):
                yield
        finally:
            entered.pop()

    def bench(fn, **kwargs):  # nothing runs: only where the timing would happen
        timed_in.append(list(entered))
        return 1.0

    monkeypatch.setattr(triton_conv, "on_device", recorded)
    monkeypatch.setattr(triton.testing, "do_bench", bench)
    x = torch.randn(1, 4, 5, 6, device=device)
    assert triton_conv._fastest_path(x, torch.randn(3, 4, 3, 3, device=device), None, 1, None) in ("triton", "cudnn")
    assert timed_in == [[x.device], [x.device]]
