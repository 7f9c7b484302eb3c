"""bn_mish's pipelined training passes against the size of their channel groups (GPU only).

The training forward and backward of the Triton ``bn_mish`` run their two passes channel group by channel
group, so that the second pass re-reads a group from the L2 cache (:mod:`cspmirror.kernels.bn_mish`). How
large a group may be before the re-read misses is a property of the GPU's cache, measured here: for the ops
suite's bn_mish shape, bf16, NCHW and channels_last, each pass is timed with ``CSPMIRROR_BN_GROUP_BYTES``
set to each of several budgets (0: one group, the two passes not pipelined; then fractions of the L2 size)
and ``PROGRAMS_PER_SM`` to 4, 8 and 16, captured in a CUDA graph (device time alone), beside a device copy
of the same minimal bytes (forward: read x, write y; backward: read x and dy, write dx), captured and
replayed alike. Variants are interleaved. At one group and at L2/4 (8 programs per SM) two more variants
price the module's other knobs: the second pass in the reduction's order instead of retracing it backwards
(``SECOND_PASS_REVERSED``), and the L2 eviction hints on (``L2_HINTS``; every other variant has them off, in
both passes, whatever the module's default).

    python -m bench.bn_groups [--out DIR] [--quick]

Writes ``bn_groups.json``, ``bn_groups.md`` and ``bn_groups.png`` into ``DIR`` (default:
``bench/results/<device>``). On a machine without CUDA it says so and exits (the interpreter times nothing
meaningful here).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from bench import harness
from bench.cases import GPU_QUICK_SHAPES, GPU_SHAPES, bn_params, fmt_shape
from cspmirror.progress import progress_bar

L2_FRACTIONS = (0, 8, 6, 4, 3, 2)  # budget = L2 / fraction; 0 = one group
PROGRAMS_PER_SM = (4, 8, 16)  # programs per SM per launch (two passes share a launch)
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


class Knobs(NamedTuple):
    """What one variant sets (each read by every launch of the training passes): the group budget in bytes
    (``CSPMIRROR_BN_GROUP_BYTES``), ``PROGRAMS_PER_SM``, ``SECOND_PASS_REVERSED`` and ``L2_HINTS``."""

    budget: int
    programs_per_sm: int
    reversed: bool = True
    hints: bool = False


def variants(budgets: list[int], programs_per_sm: tuple[int, ...], l2: int) -> list[Knobs]:
    """Every budget x programs per SM; then, at one group and at L2 / 4 (8 per SM, where swept), the walk in
    order and the eviction hints on."""
    swept = [Knobs(b, p) for b, p in itertools.product(budgets, programs_per_sm)]
    extra = [Knobs(b, 8, reversed=False) for b in sorted({0, l2 // 4}) if b in budgets and 8 in programs_per_sm]
    return swept + extra + [knobs._replace(reversed=True, hints=True) for knobs in extra]


@contextlib.contextmanager
def knobs_set(knobs: Knobs) -> Iterator[None]:
    """The module's knobs (and the group budget's environment variable) set to ``knobs``, then restored."""
    from cspmirror.kernels import bn_mish

    old_env = os.environ.get(bn_mish.GROUP_BYTES_ENV)
    old = bn_mish.PROGRAMS_PER_SM, bn_mish.SECOND_PASS_REVERSED, bn_mish.L2_HINTS
    os.environ[bn_mish.GROUP_BYTES_ENV] = str(knobs.budget)
    bn_mish.PROGRAMS_PER_SM, bn_mish.SECOND_PASS_REVERSED = knobs.programs_per_sm, knobs.reversed
    bn_mish.L2_HINTS = {"forward": knobs.hints, "backward": knobs.hints}
    try:
        yield
    finally:
        if old_env is None:
            del os.environ[bn_mish.GROUP_BYTES_ENV]
        else:
            os.environ[bn_mish.GROUP_BYTES_ENV] = old_env
        bn_mish.PROGRAMS_PER_SM, bn_mish.SECOND_PASS_REVERSED, bn_mish.L2_HINTS = old


def passes(x: torch.Tensor) -> dict[str, tuple[Callable[[], object], int]]:
    """The training forward and backward kernels on ``x`` [N, C, H, W], with their minimal bytes."""
    from cspmirror.kernels import bn_mish

    weight, bias, _, _ = bn_params(x.shape[1], x.device, x.dtype)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    dy = torch.randn_like(x)
    mean, var = bn_mish.train_forward(x, weight, bias, None, 1e-5, y)
    size = x.numel() * x.element_size()
    return {
        "fwd": (lambda: bn_mish.train_forward(x, weight, bias, None, 1e-5, y), 2 * size),
        "bwd": (lambda: bn_mish.backward(dy, x, mean, var, 1e-5, weight, bias, True, dx, True), 3 * size),
    }


def measure(shape: tuple[int, ...], device: torch.device, repeats: int, budgets: list[int] | None = None,
            programs_per_sm: tuple[int, ...] = PROGRAMS_PER_SM) -> list[dict]:
    """One row per layout, pass and variant (:func:`variants`; budgets default to the L2 fractions of
    :data:`L2_FRACTIONS`). Off CUDA the calls are timed eagerly (a smoke test of this script, nothing to
    report)."""
    from cspmirror.kernels import bn_mish

    l2 = bn_mish._l2_bytes(device)
    budgets = budgets if budgets is not None else [l2 // f if f else 0 for f in L2_FRACTIONS]
    rows = []
    jobs = [(layout, direction) for layout in LAYOUTS for direction in ("fwd", "bwd")]
    for layout, direction in progress_bar(jobs, "bn_mish groups", mininterval=10):
        x = torch.randn(shape, device=device, dtype=torch.bfloat16).contiguous(memory_format=LAYOUTS[layout])
        plan = bn_mish.make_plan(x)
        fn, num_bytes = passes(x)[direction]
        fns, meta = {}, {}
        for knobs in variants(budgets, programs_per_sm, l2):
            key = "/".join(map(str, knobs))
            fns[key] = harness.captured_under(fn, device, functools.partial(knobs_set, knobs))
            with knobs_set(knobs):
                launches = len(bn_mish.pipeline(plan, device, 2 if direction == "fwd" else 4).launches)
            meta[key] = {"budget_bytes": knobs.budget, "programs_per_sm": knobs.programs_per_sm,
                         "reversed": knobs.reversed, "hints": knobs.hints, "launches": launches}
        times, copy_ms = harness.time_beside_copy(fns, num_bytes, device, repeats)
        for key, info in meta.items():
            ms = times[key]
            rows.append({"layout": layout, "direction": direction, "shape": fmt_shape(shape), **info,
                         "l2_bytes": l2, "graph_ms": ms, "copy_graph_ms": copy_ms, "frac_copy": copy_ms / ms,
                         "bytes": num_bytes})
    return rows


def markdown(rows: list[dict], env: dict) -> str:
    lines = harness.sweep_header(
        "bn_mish training passes vs channel-group size", env,
        f"bf16, shape {rows[0]['shape']}; CUDA-graph device time, medians, interleaved; 'of copy' = a copy of "
        "the same minimal bytes / the pass (forward: x in, y out; backward: x and dy in, dx out).") + [
        "| layout | pass | group budget | programs/SM | second pass | L2 hints | launches | graph ms | of copy |",
        "|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        budget = "one group" if r["budget_bytes"] == 0 else f"{r['budget_bytes'] / 2**20:.1f} MiB"
        walk = "backwards" if r["reversed"] else "in order"
        lines.append(f"| {r['layout']} | {r['direction']} | {budget} | {r['programs_per_sm']} | {walk} | "
                     f"{'on' if r['hints'] else 'off'} | {r['launches']} | {r['graph_ms']:.4f} | "
                     f"{r['frac_copy']:.0%} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for layout, direction in itertools.product(LAYOUTS, ("fwd", "bwd")):  # the best programs/SM per budget
        best: dict[int, float] = {}
        for r in rows:  # the module's default walk and hints
            if r["layout"] == layout and r["direction"] == direction and r["reversed"] and not r["hints"]:
                best[r["budget_bytes"]] = max(best.get(r["budget_bytes"], 0.0), r["frac_copy"])
        if best:
            budgets = sorted(best)
            ax.plot([b / 2**20 for b in budgets], [best[b] for b in budgets], marker="o",
                    label=f"{layout} {direction}")
    harness.finish_fraction_plot(fig, ax, path, 0.8, "channel-group budget, MiB (0 = one group)",
                                 "fraction of copy bandwidth (best programs/SM)",
                                 "bn_mish training passes vs channel-group size")


def main(argv: list[str] | None = None) -> int:
    def measure_at(quick: bool, device: torch.device) -> list[dict]:
        return measure((GPU_QUICK_SHAPES if quick else GPU_SHAPES).bn, device, repeats=10 if quick else 30)

    return harness.sweep_main(argv, __doc__.split("\n\n")[0], "bn_groups", measure_at, markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())
