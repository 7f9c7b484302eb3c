"""The Triton mirror kernels against their GPU tiling (GPU only).

``mirror_split`` and ``mirror_fuse`` forward at the ops suite's mirror shape (bf16, split along W, mirrored,
the suite's overlap), NCHW and channels_last, each captured in a CUDA graph (device time alone) with
:data:`cspmirror.kernels.mirror.TILINGS` set to each variant: the defaults (flat tiles); 4, 8 and 16 KiB tiles
whatever the split axis; 8 elements per thread; row tiles (which leave lanes idle on rows of P = 40); mirrored
reads element-wise instead of vector groups flipped in registers, with flat and with row tiles; the split
reading both parts before writing either, with flat and with row tiles. Variants and a device copy of the same
bytes are timed interleaved.

    python -m bench.mirror_tiles [--out DIR] [--quick]

Writes ``mirror_tiles.json``, ``mirror_tiles.md`` and ``mirror_tiles.png`` into ``DIR`` (default:
``bench/results/<device>``). On a machine without CUDA it says so and exits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

from bench import harness
from bench.cases import GPU_QUICK_SHAPES, GPU_SHAPES, fmt_shape, mirror_fuse_workload, mirror_split_workload
from cspmirror.progress import progress_bar

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
WORKLOADS = {"mirror_split": mirror_split_workload, "mirror_fuse": mirror_fuse_workload}
# label -> the fields of every entry of the defaults (``TILINGS``) that the variant changes
VARIANTS: dict[str, dict] = {
    "default": {},
    "4K": {"tile_bytes": 4096},
    "8K": {"tile_bytes": 8192},
    "16K": {"tile_bytes": 16384},
    "8/thread": {"per_thread": 8},
    "rows": {"flat": False},
    "element-wise flip": {"flip_in_registers": False},
    "rows, element-wise flip": {"flat": False, "flip_in_registers": False},
    "split loads first": {"split_loads_first": True},
    "rows, split loads first": {"flat": False, "split_loads_first": True},
}
# The kind of call (an entry of TILINGS) each layout makes when split along W
KIND = {"nchw": "along", "nhwc": "across"}


@contextlib.contextmanager
def tiling_set(changes: dict) -> Iterator[None]:
    from cspmirror.kernels import mirror

    old = mirror.TILINGS
    mirror.TILINGS = mirror.tilings_with(**changes)
    try:
        yield
    finally:
        mirror.TILINGS = old


def measure(shape: tuple[int, ...], device: torch.device, repeats: int) -> list[dict]:
    """One row per layout, op and variant (:data:`VARIANTS`), with the copy's time beside it."""
    rows = []
    jobs = [(layout, op) for layout in LAYOUTS for op in WORKLOADS]
    for layout, op in progress_bar(jobs, "mirror tiles", mininterval=10):
        work = WORKLOADS[op](shape, device, torch.bfloat16, LAYOUTS[layout])

        def fn(work=work) -> object:
            return work.fn("triton", *work.args)

        fns = {label: harness.captured_under(fn, device, functools.partial(tiling_set, changes))
               for label, changes in VARIANTS.items()}
        times, copy_ms = harness.time_beside_copy(fns, work.fwd_bytes, device, repeats)
        for label, ms in times.items():
            rows.append({"layout": layout, "op": op, "shape": fmt_shape(shape), "variant": label,
                         "tiling": _tiling_of(label, layout), "graph_ms": ms, "copy_graph_ms": copy_ms,
                         "frac_copy": copy_ms / ms, "bytes": work.fwd_bytes})
    return rows


def _tiling_of(label: str, layout: str) -> dict:
    """The tiling variant ``label`` gives a call in ``layout``."""
    from cspmirror.kernels import mirror

    return mirror.tilings_with(**VARIANTS[label])[KIND[layout]]._asdict()


def markdown(rows: list[dict], env: dict) -> str:
    lines = harness.sweep_header(
        "Triton mirror kernels vs tiling", env,
        f"bf16, shape {rows[0]['shape']}, forward; CUDA-graph device time, medians, interleaved; 'of copy' = a "
        "copy of the same bytes / the op.") + [
        "| layout | op | variant | tiling | graph ms | of copy |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['op']} | {r['variant']} | {_describe(r['tiling'])} | {r['graph_ms']:.4f} | "
                     f"{r['frac_copy']:.0%} |")
    lines += ["", "Fastest per layout (split + fuse time; the defaults' sum beside; nchw sets TILINGS['along'], "
              "nhwc TILINGS['across']):", ""]
    lines += [f"- {layout}: {label} {total:.4f} ms (default {default:.4f} ms)"
              for layout, (label, total, default) in fastest(rows).items()]
    return "\n".join(lines) + "\n"


def _describe(tiling: dict) -> str:
    """E.g. ``8 KiB, 16/thread, rows, flip in registers, read-write-read-write``."""
    return (f"{tiling['tile_bytes'] // 1024} KiB, {tiling['per_thread']}/thread, "
            f"{'flat' if tiling['flat'] else 'rows'}, "
            f"{'flip in registers' if tiling['flip_in_registers'] else 'element-wise flip'}, "
            f"{'reads first' if tiling['split_loads_first'] else 'read-write-read-write'}")


def fastest(rows: list[dict]) -> dict[str, tuple[str, float, float]]:
    """Per layout: the variant with the least split + fuse time, that time, and the defaults'."""
    totals: dict[str, dict[str, float]] = {}
    for r in rows:
        per_variant = totals.setdefault(r["layout"], {})
        per_variant[r["variant"]] = per_variant.get(r["variant"], 0.0) + r["graph_ms"]
    return {layout: (min(t, key=t.get), min(t.values()), t["default"]) for layout, t in totals.items()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = list(VARIANTS)
    jobs = sorted({(r["layout"], r["op"]) for r in rows})
    width = 0.8 / len(jobs)
    for i, (layout, op) in enumerate(jobs):
        fracs = {r["variant"]: r["frac_copy"] for r in rows if r["layout"] == layout and r["op"] == op}
        ax.bar([j + i * width for j in range(len(labels))], [fracs.get(label, 0.0) for label in labels],
               width, label=f"{layout} {op}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=20, ha="right")
    harness.finish_fraction_plot(fig, ax, path, 0.85, "tiling variant", "fraction of copy bandwidth",
                                 "Triton mirror kernels vs tiling (forward)")


def main(argv: list[str] | None = None) -> int:
    def measure_at(quick: bool, device: torch.device) -> list[dict]:
        return measure((GPU_QUICK_SHAPES if quick else GPU_SHAPES).mirror, device, repeats=10 if quick else 30)

    return harness.sweep_main(argv, __doc__.split("\n\n")[0], "mirror_tiles", measure_at, markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())
