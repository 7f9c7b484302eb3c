"""The Triton mirror kernels against their tile size and warps per tile (GPU only).

``mirror_split`` and ``mirror_fuse`` forward at the ops suite's mirror shape (bf16, split along W, mirrored,
the suite's overlap), NCHW and channels_last, each captured in a CUDA graph (device time alone) with
``TILE_BYTES`` (both entries) and ``ELEMENTS_PER_THREAD`` of :mod:`cspmirror.kernels.mirror` set to each
variant: tile sizes from 4 to 32 KiB at 16 elements per thread, and 8 or 32 elements per thread at 8 KiB.
Variants and a device copy of the same bytes are timed interleaved.

    python -m bench.mirror_tiles [--out DIR] [--quick]

Writes ``mirror_tiles.json``, ``mirror_tiles.md`` and ``mirror_tiles.png`` into ``DIR`` (default:
``bench/results/<device>``). On a machine without CUDA it says so and exits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from bench import harness
from bench.cases import GPU_QUICK_SHAPES, GPU_SHAPES, fmt_shape, mirror_fuse_workload, mirror_split_workload

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
WORKLOADS = {"mirror_split": mirror_split_workload, "mirror_fuse": mirror_fuse_workload}


class Tiling(NamedTuple):
    """What one variant sets: the mirror kernels' ``TILE_BYTES`` and ``ELEMENTS_PER_THREAD``."""

    tile_bytes: int
    per_thread: int


VARIANTS = [Tiling(b, 16) for b in (4096, 8192, 16384, 32768)] + [Tiling(8192, 8), Tiling(8192, 32)]


@contextlib.contextmanager
def tiling_set(tiling: Tiling) -> Iterator[None]:
    from cspmirror.kernels import mirror

    old = mirror.TILE_BYTES, mirror.ELEMENTS_PER_THREAD
    mirror.TILE_BYTES = {"along": tiling.tile_bytes, "across": tiling.tile_bytes}
    mirror.ELEMENTS_PER_THREAD = tiling.per_thread
    try:
        yield
    finally:
        mirror.TILE_BYTES, mirror.ELEMENTS_PER_THREAD = old


def measure(shape: tuple[int, ...], device: torch.device, repeats: int) -> list[dict]:
    """One row per layout, op and variant (:data:`VARIANTS`), with the copy's time beside it."""
    rows = []
    jobs = [(layout, op) for layout in LAYOUTS for op in WORKLOADS]
    for layout, op in tqdm(jobs, desc="mirror tiles", mininterval=10):
        work = WORKLOADS[op](shape, device, torch.bfloat16)
        args = [a.contiguous(memory_format=LAYOUTS[layout]) for a in work.args]

        def fn(args: list[torch.Tensor] = args, work=work) -> object:
            return work.fn("triton", *args)

        fns = {tiling: harness.captured_under(fn, device, functools.partial(tiling_set, tiling))
               for tiling in VARIANTS}
        times, copy_ms = harness.time_beside_copy(fns, work.fwd_bytes, device, repeats)
        for tiling, ms in times.items():
            rows.append({"layout": layout, "op": op, "shape": fmt_shape(shape), "tile_bytes": tiling.tile_bytes,
                         "elements_per_thread": tiling.per_thread, "graph_ms": ms, "copy_graph_ms": copy_ms,
                         "frac_copy": copy_ms / ms, "bytes": work.fwd_bytes})
    return rows


def markdown(rows: list[dict], env: dict) -> str:
    lines = harness.sweep_header(
        "Triton mirror kernels vs tile size", env,
        f"bf16, shape {rows[0]['shape']}, forward; CUDA-graph device time, medians, interleaved; 'of copy' = a "
        "copy of the same bytes / the op.") + [
        "| layout | op | tile KiB | elements/thread | graph ms | of copy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['op']} | {r['tile_bytes'] // 1024} | {r['elements_per_thread']} | "
                     f"{r['graph_ms']:.4f} | {r['frac_copy']:.0%} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{t.tile_bytes // 1024}K/{t.per_thread}" for t in VARIANTS]
    jobs = sorted({(r["layout"], r["op"]) for r in rows})
    width = 0.8 / len(jobs)
    for i, (layout, op) in enumerate(jobs):
        fracs = {(r["tile_bytes"], r["elements_per_thread"]): r["frac_copy"] for r in rows
                 if r["layout"] == layout and r["op"] == op}
        ax.bar([j + i * width for j in range(len(VARIANTS))], [fracs.get(tuple(t), 0.0) for t in VARIANTS],
               width, label=f"{layout} {op}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(VARIANTS))], labels)
    harness.finish_fraction_plot(fig, ax, path, 0.85, "tile KiB / elements per thread",
                                 "fraction of copy bandwidth", "Triton mirror kernels vs tile size (forward)")


def main(argv: list[str] | None = None) -> int:
    def measure_at(quick: bool, device: torch.device) -> list[dict]:
        return measure((GPU_QUICK_SHAPES if quick else GPU_SHAPES).mirror, device, repeats=10 if quick else 30)

    return harness.sweep_main(argv, __doc__.split("\n\n")[0], "mirror_tiles", measure_at, markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())
