"""Timing helpers shared by every benchmark: medians over repeats, CUDA events on the GPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, repeats: int = 20) -> Timing:
    """Median and 20th/80th percentiles of ``fn()`` in milliseconds (CUDA events on CUDA devices)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    q = statistics.quantiles(samples, n=5) if len(samples) > 1 else [samples[0]] * 4
    return Timing(statistics.median(samples), q[0], q[3], repeats)


def copy_time(num_bytes: int, device: torch.device | str, warmup: int = 3, repeats: int = 20) -> Timing:
    """Time of a device copy reading and writing ``num_bytes // 2`` bytes each (the same traffic)."""
    n = max(num_bytes // 2, 1)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device, warmup, repeats)


def gbps(num_bytes: int, ms: float) -> float:
    return num_bytes / ms / 1e6
