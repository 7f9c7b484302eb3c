"""Timing helpers shared by every benchmark: medians over repeats, CUDA events on the GPU, the machine's
description, time budgets and the classification of "this backend cannot run here" errors."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_sync = sync  # old private name


def _one_sample(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one ``fn()``: CUDA events on CUDA devices, the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _summary(samples: list[float]) -> Timing:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=5) if len(samples) > 1 else [samples[0]] * 4
    return Timing(statistics.median(samples), q[0], q[3], len(samples))


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, repeats: int = 20) -> Timing:
    """Median and 20th/80th percentiles of ``fn()`` in milliseconds (CUDA events on CUDA devices)."""
    return time_interleaved({"fn": fn}, device, warmup, repeats)["fn"]


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str, warmup: int = 3,
                     repeats: int = 20) -> dict[str, Timing]:
    """:func:`time_fn` of several functions, one call of each per round, round after round, so that load
    from other processes (a shared CPU) or clock changes hit them alike; their ratios are then fair."""
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_one_sample(fn, device))
    return {name: _summary(s) for name, s in samples.items()}


def graph_replay(fn: Callable[[], object], device: torch.device | str) -> Callable[[], object] | None:
    """``fn`` captured in a CUDA graph, as the callable that replays it; None off CUDA or when ``fn`` cannot
    be captured (a host sync, a CPU tensor, ...).

    Timing the replay gives the device time of ``fn``'s kernels alone: an eager call's CUDA-event time also
    holds its host-side cost whenever the GPU waits for the next launch. Warm-up runs on a side stream first,
    as capture requires (allocator, cuBLAS / cuDNN workspaces, lazy initialisation).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - not capturable: the caller keeps the eager timing only
        _release_rng_from_capture(device)
        torch.cuda.synchronize(device)
        if isinstance(exc, CaseTimeout):  # the case's time limit, not a capture failure
            raise
        return None
    return graph.replay


def captured_under(fn: Callable[[], object], device: torch.device,
                   setting: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], object]:
    """``fn`` under ``setting()`` (module knobs a sweep varies): a CUDA graph captured under it, whose replays
    keep what it set; or, off CUDA or where ``fn`` cannot be captured, a call that sets it each time."""
    with setting():
        replay = graph_replay(fn, device)
    if replay is not None:
        return replay

    def call() -> object:
        with setting():
            return fn()

    return call


def sweep_main(argv: list[str] | None, description: str, name: str,
               measure: Callable[[bool, torch.device], list[dict]], markdown: Callable[[list[dict], dict], str],
               plot: Callable[[list[dict], Path], None]) -> int:
    """The command line of a GPU-only sweep, ``python -m bench.<name> [--out DIR] [--quick]``: rows from
    ``measure(quick, device)``, written as ``<name>.json``, ``.md`` and ``.png`` into DIR (default:
    ``bench/results/<device>``); the table is printed. Without CUDA it says so and measures nothing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="smaller shape, fewer repeats")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench.{name}: no CUDA device here; nothing measured")
        return 0
    device = torch.device("cuda")
    rows = measure(args.quick, device)
    env = environment(device)
    out = args.out or Path(__file__).resolve().parent / "results" / env["device_slug"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    table = markdown(rows, env)
    (out / f"{name}.md").write_text(table)
    plot(rows, out / f"{name}.png")
    print(table)
    return 0


def time_beside_copy(fns: dict, num_bytes: int, device: torch.device, repeats: int) -> tuple[dict, float]:
    """Median ms of each of a sweep's ``fns`` and of a copy of ``num_bytes`` (captured like them where it can
    be), timed interleaved: ``({key: ms}, copy ms)``."""
    copy = copy_fn(num_bytes, device)
    timings = time_interleaved({**fns, "copy": graph_replay(copy, device) or copy}, device, warmup=3,
                               repeats=repeats)
    return {key: timings[key].median_ms for key in fns}, timings["copy"].median_ms


def sweep_header(title: str, env: dict, what: str) -> list[str]:
    """The first lines of a sweep's markdown: its title on the device, the versions, date and ``what``."""
    return [f"# {title} ({env['device_name']})", "",
            f"torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}; {env['date']}. {what}", ""]


def finish_fraction_plot(fig, ax, path: Path, target: float, xlabel: str, ylabel: str, title: str) -> None:
    """Label a sweep's chart of fractions of copy bandwidth, draw the issue's target, save it as ``path``."""
    import matplotlib.pyplot as plt

    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _release_rng_from_capture(device: torch.device) -> None:
    """A capture that fails before its end leaves the device's default generator marked as capturing, and
    every later random op on the device raises "Offset increment outside graph capture encountered
    unexpectedly" (seen on an H200: one failed capture ended the rest of the suite). A fresh state with the
    same seed releases it."""
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        generator = torch.cuda.default_generators[index]
        fresh = torch.Generator(device=torch.device("cuda", index))
        fresh.manual_seed(generator.initial_seed())
        generator.graphsafe_set_state(fresh.graphsafe_get_state())
    except Exception:  # noqa: BLE001 - older torch: nothing to release with
        pass


def copy_fn(num_bytes: int, device: torch.device | str) -> Callable[[], object]:
    """A device copy reading and writing ``num_bytes // 2`` bytes each: an op's fewest bytes moved at the
    machine's copy bandwidth (the yardstick of every memory-bound benchmark)."""
    src = torch.empty(max(num_bytes // 2, 1), dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_time(num_bytes: int, device: torch.device | str, warmup: int = 3, repeats: int = 20) -> Timing:
    """Time of :func:`copy_fn` of ``num_bytes``."""
    return time_fn(copy_fn(num_bytes, device), device, warmup, repeats)


def gbps(num_bytes: int, ms: float) -> float:
    """Bytes moved per millisecond, in GB/s (1e9 bytes)."""
    return num_bytes / ms / 1e6


def tflops(flops: float, ms: float) -> float:
    """Floating-point operations per millisecond, in TFLOP/s."""
    return flops / ms / 1e9


def matmul_tflops(device: torch.device | str, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Measured rate of an ``n x n x n`` matrix product on random data (the arithmetic ceiling)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_fn(lambda: a @ b, device, warmup=2, repeats=repeats)
    return tflops(2.0 * n ** 3, timing.median_ms)


# --------------------------------------------------------------------------------------------- the machine


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device | str) -> str:
    """Folder name for a device's results: ``cpu``, or the GPU's name in lower case (``nvidia-h100-80gb-hbm3``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def package_version(name: str) -> str | None:
    """Installed version of a distribution, without importing it (None when absent)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str) -> dict:
    """What the numbers were measured on: device, library versions, date."""
    device = torch.device(device)
    env = {
        "device": str(device),
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "timm": package_version("timm"),
        "torchvision": package_version("torchvision"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    return env


# ------------------------------------------------------------------------------------------ budgets, errors


class CaseTimeout(Exception):
    """A single benchmark case ran past the time it was given."""


class Deadline:
    """A wall-clock budget for a whole suite (``None``: unlimited)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def allows(self, seconds: float) -> bool:
        """Whether ``seconds`` more still fit in the budget."""
        return self.remaining() >= seconds


# Longer limits are no limit (setitimer takes no more than a time_t: --budget 1e300 raised OverflowError).
MAX_TIMER_S = 1e8


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`CaseTimeout` in the main thread after ``seconds`` (POSIX; a no-op elsewhere).

    Used to stop a ``torch.compile`` that would blow the suite's budget; the interrupted case is recorded
    as an error and the suite goes on.
    """
    if seconds <= 0:
        raise CaseTimeout("not started: the time budget is spent")
    usable = (
        hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        and seconds < MAX_TIMER_S
    )
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise CaseTimeout(f"stopped after {seconds:.0f} s (time budget)")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def skip_reason(exc: BaseException) -> str | None:
    """The reason to record as SKIP when ``exc`` says a backend cannot run here; None for a real failure."""
    from cspmirror.backends import BackendUnavailableError

    if isinstance(exc, (BackendUnavailableError, ImportError, NotImplementedError)):
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def short_error(exc: BaseException, limit: int = 240) -> str:
    """One line naming ``exc``, cut to ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
