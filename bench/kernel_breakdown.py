"""Where the fused ops' device time goes, kernel by kernel (GPU only).

The Triton and reference backends of ``mirror_split``, ``mirror_fuse`` and ``bn_mish`` (train and eval) at the
ops suite's shapes, bf16, NCHW and channels_last, forward and backward, each run under ``torch.profiler``
(CUDA activity, eager calls): per call of the op, every kernel it launches with its launch count and device
time, and their sum beside a profiled device copy of the op's minimal bytes (the ops suite's yardstick). It
says which launch of a multi-kernel op (a reduction and its elementwise pass, a running-statistics update,
a zero fill) holds the time that a fraction of copy bandwidth alone cannot.

    python -m bench.kernel_breakdown [--out DIR] [--quick]

Writes ``kernel_breakdown.json``, ``kernel_breakdown.md`` and ``kernel_breakdown.png`` into ``DIR``
(default: ``bench/results/<device>``). On a machine without CUDA it says so and exits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from bench import harness
from bench.cases import (
    GPU_QUICK_SHAPES,
    GPU_SHAPES,
    Workload,
    bn_mish_workload,
    fmt_shape,
    mirror_fuse_workload,
    mirror_split_workload,
)
from bench.variants import prepare
from cspmirror.progress import progress_bar

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
VARIANTS = ("triton", "reference")
# op -> (workload builder (shape, device, dtype, layout), directions, which of the suite's shapes)
OPS: dict[str, tuple[Callable[..., Workload], tuple[str, ...], str]] = {
    "mirror_split": (mirror_split_workload, ("fwd", "bwd"), "mirror"),
    "mirror_fuse": (mirror_fuse_workload, ("fwd", "bwd"), "mirror"),
    "bn_mish_train": (lambda s, d, t, layout: bn_mish_workload(s, d, t, True, layout), ("fwd", "bwd"), "bn"),
    "bn_mish_eval": (lambda s, d, t, layout: bn_mish_workload(s, d, t, False, layout), ("fwd",), "bn"),
}


def kernel_times(events: Iterable, calls: int) -> list[dict]:
    """Per call: ``{"kernel", "launches", "us"}`` for each device-side event of a profile (``key_averages()``
    of ``calls`` calls), the longest first. Host-side events, and any without device time, are left out."""
    rows = []
    for e in events:
        if getattr(e, "device_type", torch.autograd.DeviceType.CUDA) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:  # torch before 2.4
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0:
            rows.append({"kernel": e.key, "launches": e.count / calls, "us": us / calls})
    return sorted(rows, key=lambda r: -r["us"])


def profile(fn: Callable[[], object], calls: int) -> list[dict]:
    """:func:`kernel_times` of ``calls`` calls of ``fn`` (already warm) under the CUDA profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return kernel_times(prof.key_averages(), calls)


def measure(shapes, device: torch.device, calls: int) -> list[dict]:
    """One row per op, layout, direction and variant: its kernels, their total and the copy's."""
    rows = []
    jobs = [(op, layout, d) for op, (_, directions, _) in OPS.items() for layout in LAYOUTS for d in directions]
    for op, layout, direction in progress_bar(jobs, "kernel breakdown", mininterval=10):
        build, directions, which = OPS[op]
        shape = shapes.mirror if which == "mirror" else shapes.bn
        copy_bytes = None
        for variant in VARIANTS:
            work = build(shape, device, torch.bfloat16, LAYOUTS[layout])
            fn = prepare(work, direction, variant, device, op, trains="bwd" in directions)
            for _ in range(3):
                fn()
            kernels = profile(fn, calls)
            copy_bytes = work.fwd_bytes if direction == "fwd" else work.bwd_bytes
            rows.append({"op": op, "layout": layout, "shape": fmt_shape(shape), "direction": direction,
                         "variant": variant, "kernels": kernels, "total_us": sum(k["us"] for k in kernels),
                         "launches": sum(k["launches"] for k in kernels), "bytes": copy_bytes})
        copy = harness.copy_fn(copy_bytes, device)
        copy()
        copy_us = sum(k["us"] for k in profile(copy, calls))
        for r in rows[-len(VARIANTS):]:
            r["copy_us"] = copy_us
    return rows


def markdown(rows: list[dict], env: dict) -> str:
    lines = harness.sweep_header(
        "Fused ops, kernel by kernel", env,
        "bf16, eager calls under torch.profiler (CUDA activity); per call of the op: each kernel's launches and "
        "device time; 'of copy' = a profiled copy of the op's minimal bytes / the op's kernels' sum.") + [
        "| op | layout | dir | variant | kernels' sum us | of copy | launches | kernel: us (launches) |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        detail = "; ".join(f"{short_kernel_name(k['kernel'])}: {k['us']:.1f} ({k['launches']:g})"
                           for k in r["kernels"])
        frac = f"{r['copy_us'] / r['total_us']:.0%}" if r["total_us"] else "—"
        lines.append(f"| {r['op']} | {r['layout']} | {r['direction']} | {r['variant']} | {r['total_us']:.1f} | "
                     f"{frac} | {r['launches']:g} | {detail} |")
    return "\n".join(lines) + "\n"


def short_kernel_name(kernel: str, limit: int = 48) -> str:
    """A kernel's name without return type, template arguments and parameters, cut to ``limit`` characters."""
    name = kernel.replace("(anonymous namespace)::", "").split("(")[0].split("<")[0].strip().removeprefix("void ")
    name = name or kernel
    return name if len(name) <= limit else name[: limit - 1] + "…"


def plot(rows: list[dict], path: Path) -> None:
    """Stacked bars per (op, direction, layout, variant): each kernel's share of the op's device time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows)), 5))
    for i, r in enumerate(rows):
        bottom = 0.0
        for k in r["kernels"]:
            ax.bar(i, k["us"], bottom=bottom, color=_colour(k["kernel"]), edgecolor="white", linewidth=0.3)
            bottom += k["us"]
        ax.plot([i - 0.4, i + 0.4], [r["copy_us"]] * 2, color="black", lw=1)
    labels = [f"{r['op']} {r['direction']} {r['layout']} {r['variant'][:3]}" for r in rows]
    ax.set_xticks(range(len(rows)), labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("device us per call (black line: copy of the same bytes)")
    ax.set_title("Fused ops, kernel by kernel (one colour per kernel name)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _colour(kernel: str) -> tuple:
    import matplotlib

    return matplotlib.colormaps["tab20"](sum(map(ord, short_kernel_name(kernel))) % 20)


def main(argv: list[str] | None = None) -> int:
    def measure_at(quick: bool, device: torch.device) -> list[dict]:
        return measure(GPU_QUICK_SHAPES if quick else GPU_SHAPES, device, calls=5 if quick else 20)

    return harness.sweep_main(argv, __doc__.split("\n\n")[0], "kernel_breakdown", measure_at, markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())
