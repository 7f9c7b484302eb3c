"""Whole-model measurements shared by the ``models`` and ``compare`` suites: a training step (forward,
cross-entropy, backward, SGD step) and an inference forward, with throughput and memory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import harness


@dataclass(frozen=True)
class Measure:
    """How one model is measured."""

    mode: str            # "train" or "infer"
    batch: int
    resolution: int
    dtype: torch.dtype   # train: autocast dtype (fp32: no autocast); infer: the model's dtype
    warmup: int
    repeats: int
    compiled: bool = False


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for half dtypes (parameters stay fp32, as in ordinary training)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def activation_bytes(model: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of one forward (the activation
    memory of training, without the allocator's slack; works on every device, eager models only)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device.type)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, dtype):
        out = model(x)
    del out
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for (ptr, _), n in seen.items() if ptr not in params)


def train_step_fn(model: nn.Module, x: torch.Tensor, target: torch.Tensor, device: torch.device,
                  dtype: torch.dtype) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x).float(), target)
        loss.backward()
        opt.step()
    return step


def infer_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)
    return forward


def measure(model: nn.Module, m: Measure, device: torch.device, num_classes: int = 1000) -> dict:
    """Time ``model`` (already on ``device``, in the mode and dtype ``m`` asks) and report images/s and
    memory. Peak memory is ``torch.cuda.max_memory_allocated`` over one step (GPU only); activation memory
    is what autograd saves (training, eager only)."""
    x_dtype = m.dtype if m.mode == "infer" else torch.float32
    x = torch.randn(m.batch, 3, m.resolution, m.resolution, device=device, dtype=x_dtype)
    result: dict = {"batch": m.batch, "resolution": m.resolution}
    if m.mode == "train" and not m.compiled:
        result["act_mib"] = activation_bytes(model, x, device, m.dtype) / 2 ** 20
    runner = torch.compile(model, dynamic=False) if m.compiled else model
    if m.mode == "train":
        target = torch.randint(0, num_classes, (m.batch,), device=device)
        fn = train_step_fn(runner, x, target, device, m.dtype)
    else:
        fn = infer_fn(runner, x)
    t0 = time.perf_counter()
    fn()
    harness.sync(device)
    result["first_call_s"] = round(time.perf_counter() - t0, 2)
    if device.type == "cuda":
        fn()
        harness.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        harness.sync(device)
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    timing = harness.time_fn(fn, device, m.warmup, m.repeats)
    result.update(timing.as_dict(), images_per_s=m.batch / timing.median_ms * 1e3)
    return result


def measure_fitting(build: Callable[[], nn.Module], m: Measure, device: torch.device) -> dict:
    """:func:`measure`, halving the batch on CUDA out-of-memory (down to 1)."""
    import dataclasses

    while True:
        try:
            return measure(build(), m, device)
        except torch.cuda.OutOfMemoryError:
            if m.batch == 1:
                raise
            m = dataclasses.replace(m, batch=m.batch // 2)
            torch.cuda.empty_cache()
