"""The ways each op case is run ("variants"): the reference eager, torch.compile of the baseline, the fast
backends, and the unfused conv baseline. Each variant turns a :class:`~bench.cases.Workload` into a
no-argument forward callable, or raises to say why it cannot run here."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator

import torch

from cspmirror import backends

from .cases import Workload

VARIANTS = ("reference", "eager_cbm", "compile", "triton", "extension")
"""Every variant name; ``triton[<path>]`` variants are added when the Triton conv lets a path be forced."""


class NotTimed(Exception):
    """This variant does not run here, for a reason worth recording (becomes a SKIP row)."""


def compile_mode(device: torch.device, op: str) -> str:
    """torch.compile mode of the baseline: max-autotune (no CUDA graphs) for GPU convolutions, else default."""
    return "max-autotune-no-cudagraphs" if device.type == "cuda" and op == "conv_bn_mish" else "default"


def backend_ready(name: str, device: torch.device) -> None:
    """Raise :class:`NotTimed` unless ``name`` can be timed on ``device``."""
    if name == "triton":
        if device.type != "cuda":
            raise NotTimed("Triton runs on the CPU only in its interpreter (TRITON_INTERPRET=1), which is a "
                           "correctness tool, not a performance path: not timed")
        status = backends.triton_status(device)
    else:
        status = backends.extension_status()
    if not status.available:
        raise NotTimed(status.reason)


def triton_conv_paths() -> list[str]:
    """The conv paths the Triton backend lets a caller force (e.g. "triton" implicit GEMM vs "cudnn"),
    from ``cspmirror.ops.triton_conv.PATHS`` ("auto" left out); empty when it exposes none."""
    try:
        module = importlib.import_module("cspmirror.ops.triton_conv")
    except Exception:  # noqa: BLE001 - absent or broken backend: no paths to force
        return []
    if not getattr(module, "PATH_ENV", None):
        return []
    return [str(p) for p in getattr(module, "PATHS", ()) if p != "auto"]


@contextlib.contextmanager
def forced_conv_path(path: str | None) -> Iterator[None]:
    """Force the Triton conv path through its environment switch (``CSPMIRROR_CONV_PATH``, read per call)."""
    if not path:
        yield
        return
    name = importlib.import_module("cspmirror.ops.triton_conv").PATH_ENV
    saved = os.environ.get(name)
    os.environ[name] = path
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def variants_for(op: str, device: torch.device, wanted: set[str] | None = None) -> list[str]:
    """Variant names for ``op``: conv gets the unfused eager baseline and any forcible Triton paths."""
    names = ["reference", "triton", "extension"]
    if op == "conv_bn_mish":
        names.insert(1, "eager_cbm")
        if device.type == "cuda" and backends.triton_status(device).available:
            names[3:3] = [f"triton[{p}]" for p in triton_conv_paths()]
    names.append("compile")  # last: its compile may run into the time budget
    if wanted:
        names = [n for n in names if n in wanted or n.split("[")[0] in wanted]
    return names


def make_forward(variant: str, work: Workload, device: torch.device, op: str,
                 args: tuple | None = None) -> Callable[[], torch.Tensor]:
    """A no-argument callable running ``work`` (on ``args``, default ``work.args``) the ``variant`` way,
    compiling it if needed; not yet run."""
    args = work.args if args is None else args
    if variant == "reference":
        return lambda: work.fn("reference", *args)
    if variant == "eager_cbm":
        if work.baseline is None:
            raise NotTimed("no unfused baseline for this op")
        return lambda: work.baseline(*work.baseline_args)
    if variant == "compile":
        if work.baseline is not None:
            fn, args = work.baseline, work.baseline_args
        else:
            def fn(*t):
                return work.fn("reference", *t)
        compiled = torch.compile(fn, mode=compile_mode(device, op), dynamic=False)
        return lambda: compiled(*args)
    name, _, path = variant.partition("[")
    if name in ("triton", "extension"):
        backend_ready(name, device)
        path = path.rstrip("]")

        def run() -> torch.Tensor:
            with forced_conv_path(path):
                return work.fn(name, *args)
        return run
    raise ValueError(f"unknown variant {variant!r}")


def make_backward(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    """A callable timing only the backward: one forward now, then ``autograd.grad`` with the graph kept."""
    y = forward()
    dy = torch.randn_like(y)
    return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)


def prepare(work: Workload, direction: str, variant: str, device: torch.device, op: str,
            trains: bool) -> Callable[[], object]:
    """The callable to time for one (case, direction, variant), not yet called.

    ``trains``: the op has a backward, so its forward runs with autograd recording (as in training) and
    the differentiable inputs require grad; otherwise everything runs under ``no_grad``.
    """
    if trains:
        for i in work.grad_args:
            work.args[i].requires_grad_(True)
    args = work.args
    if direction == "bwd":  # its own copy of what the op updates in place (running stats), which the kept
        args = tuple(a.detach().clone() if isinstance(a, torch.Tensor) and i not in work.grad_args else a
                     for i, a in enumerate(args))  # graph saves: other variants' forwards must not bump it
    with torch.set_grad_enabled(trains):
        forward = make_forward(variant, work, device, op, args)
        fn = forward if direction == "fwd" else make_backward(forward, [args[i] for i in work.grad_args])

    def call() -> object:
        with torch.set_grad_enabled(trains):
            return fn()
    return call
