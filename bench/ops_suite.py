"""Microbenchmarks of the fused ops: every case of :mod:`bench.cases` x every variant of
:mod:`bench.variants`, forward and backward, with a device copy of the same bytes as the yardstick."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from cspmirror.progress import progress_bar

from . import harness
from .cases import OpCase, Workload
from .variants import NotTimed, prepare, variants_for


@dataclass(frozen=True)
class OpsSettings:
    device: torch.device
    dtype: torch.dtype
    warmup: int
    repeats: int
    compile_min_s: float  # start a compile only when this much budget is left
    variants: frozenset[str] | None = None
    compile: bool = True


def settings_for(device: torch.device, dtype: torch.dtype, quick: bool,
                 variants: Iterable[str] | None = None, compile: bool = True) -> OpsSettings:
    gpu = device.type == "cuda"
    warmup, repeats = (5, 30) if gpu else ((2, 10) if quick else (3, 20))
    return OpsSettings(device, dtype, warmup, repeats, compile_min_s=25.0 if gpu else 40.0,
                       variants=frozenset(variants) if variants else None, compile=compile)


def ceilings(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """The two measured ceilings: a large device copy (GB/s, bytes read + written) and a matrix product."""
    gpu = device.type == "cuda"
    copy_bytes = (2 << 30) if gpu else (64 << 20 if quick else 256 << 20)
    n = 8192 if gpu else 1024
    copy = harness.copy_time(copy_bytes, device, warmup=2, repeats=10)
    return {
        "copy_gbps": harness.gbps(copy_bytes, copy.median_ms),
        "copy_bytes": copy_bytes,
        "matmul_tflops": harness.matmul_tflops(device, dtype, n),
        "matmul_n": n,
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }


def base_row(case: OpCase, direction: str, variant: str, s: OpsSettings) -> dict:
    return {
        "suite": "ops", "op": case.op, "shape": case.label, "direction": direction, "variant": variant,
        "dtype": str(s.dtype).removeprefix("torch."), "count_in_model": case.weight,
    }


def prepare_variant(case: OpCase, work: Workload, direction: str, variant: str, s: OpsSettings,
                    deadline: harness.Deadline) -> tuple[Callable[[], object] | None, dict]:
    """The callable to time for ``variant``, already called once (compile, build and autotune happen in
    that first call, kept out of the timing), with its row so far; ``(None, row)`` when it cannot run."""
    row = base_row(case, direction, variant, s)
    nbytes = work.fwd_bytes if direction == "fwd" else work.bwd_bytes
    row.update(bytes=nbytes, flops=work.flops if direction == "fwd" else 0.0)
    if variant == "copy":
        return harness.copy_fn(nbytes, s.device), {**row, "flops": 0.0}
    if variant == "compile" and not deadline.allows(s.compile_min_s):
        return None, {**row, "status": "skip", "reason": "time budget: no compile started this late"}
    t0 = time.perf_counter()
    try:
        with harness.time_limit(deadline.remaining()):
            fn = prepare(work, direction, variant, s.device, case.op, trains="bwd" in case.directions)
            fn()
            harness.sync(s.device)
    except NotTimed as exc:
        return None, {**row, "status": "skip", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the suite
        reason = harness.skip_reason(exc)
        return None, {**row, "status": "skip" if reason else "error", "reason": reason or harness.short_error(exc)}
    return fn, {**row, "first_call_s": round(time.perf_counter() - t0, 3)}


def timed_row(row: dict, timing: harness.Timing) -> dict:
    row = {**row, "status": "ok", **timing.as_dict(), "gbps": harness.gbps(row["bytes"], timing.median_ms)}
    if row.get("flops"):
        row["tflops"] = harness.tflops(row["flops"], timing.median_ms)
    return row


def run_direction(case: OpCase, work: Workload, direction: str, variants: list[str], s: OpsSettings,
                  deadline: harness.Deadline) -> list[dict]:
    """Every variant of one case and direction, timed interleaved (round after round) beside the copy."""
    fns, rows = {}, {}
    for variant in variants:
        fns[variant], rows[variant] = prepare_variant(case, work, direction, variant, s, deadline)
    ready = {v: fn for v, fn in fns.items() if fn is not None}
    try:
        with harness.time_limit(deadline.remaining()):
            timings = harness.time_interleaved(ready, s.device, s.warmup, s.repeats)
        timed = {v: timed_row(rows[v], timings[v]) for v in ready}
        if direction == "fwd":
            add_graph_times(timed, ready, s, deadline)
        return [timed.get(v, rows[v]) for v in variants]
    except harness.CaseTimeout as exc:
        return [{**rows[v], "status": "error", "reason": str(exc)} if v in ready else rows[v] for v in variants]
    except Exception:  # noqa: BLE001 - one variant failed in a later call: time each alone to find which
        return [time_alone(rows[v], ready[v], s, deadline) if v in ready else rows[v] for v in variants]


def add_graph_times(rows: dict[str, dict], fns: dict[str, Callable[[], object]], s: OpsSettings,
                    deadline: harness.Deadline) -> None:
    """On CUDA, add ``graph_ms`` to each row whose function can be captured in a CUDA graph: the median
    device time of its kernels, replays timed interleaved as the eager calls were. Best effort: a failure
    leaves the eager timings alone. Forward only: a backward timed alone runs on the stream of the forward
    that recorded its graph, outside the capture's stream, which invalidates the capture (seen on an H200)."""
    if s.device.type != "cuda":
        return
    try:
        with harness.time_limit(deadline.remaining()):
            replays = {v: harness.graph_replay(fn, s.device) for v, fn in fns.items()}
            replays = {v: r for v, r in replays.items() if r is not None}
            timings = harness.time_interleaved(replays, s.device, s.warmup, s.repeats)
    except Exception:  # noqa: BLE001
        return
    for v, timing in timings.items():
        rows[v]["graph_ms"] = timing.median_ms


def time_alone(row: dict, fn: Callable[[], object], s: OpsSettings, deadline: harness.Deadline) -> dict:
    try:
        with harness.time_limit(deadline.remaining()):
            return timed_row(row, harness.time_fn(fn, s.device, s.warmup, s.repeats))
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": "error", "reason": harness.short_error(exc)}


def derive(rows: list[dict]) -> list[dict]:
    """Add, per (op, shape, direction, dtype) group: fraction of copy bandwidth, speed-up vs the
    ``compile`` variant and vs the eager baseline (``eager_cbm`` for conv, ``reference`` otherwise)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("suite") == "ops" and r.get("status") == "ok":
            groups.setdefault((r["op"], r["shape"], r["direction"], r["dtype"]), {})[r["variant"]] = r
    for (op, *_), group in groups.items():
        copy, comp = group.get("copy"), group.get("compile")
        eager = group.get("eager_cbm" if op == "conv_bn_mish" else "reference")
        for r in group.values():
            ms, timed = r["median_ms"], r["variant"] != "copy"
            r["frac_copy"] = copy["median_ms"] / ms if copy else None
            r["vs_compile"] = comp["median_ms"] / ms if comp and timed else None
            r["vs_eager"] = eager["median_ms"] / ms if eager and timed else None
            # The same ratios between device times (CUDA graph replays: no host-side cost in them).
            graph = r.get("graph_ms")
            if graph:
                r["frac_copy_graph"] = copy["graph_ms"] / graph if copy and copy.get("graph_ms") else None
                r["vs_compile_graph"] = (comp["graph_ms"] / graph if comp and comp.get("graph_ms") and timed
                                         else None)
                r["vs_eager_graph"] = (eager["graph_ms"] / graph if eager and eager.get("graph_ms") and timed
                                       else None)
    return rows


def run(cases: list[OpCase], s: OpsSettings, deadline: harness.Deadline,
        on_row: Callable[[dict], None], progress: bool = True) -> None:
    """Time every case x direction x variant; ``on_row`` receives each row as soon as it exists."""
    bar = progress_bar(cases, f"ops on {s.device}", enabled=progress)
    for case in bar:
        variants = variants_for(case.op, s.device, s.variants)
        if s.variants is None or "copy" in s.variants:
            variants.insert(0, "copy")
        if not (case.compile_baseline and s.compile):
            variants = [v for v in variants if v != "compile"]
        if deadline.remaining() <= 0:
            for d in case.directions:
                on_row({**base_row(case, d, "*", s), "status": "skip", "reason": "time budget"})
            continue
        bar.set_postfix_str(case.name)
        torch._dynamo.reset()  # a fresh compile cache per case: no recompile limit, no eager fallback
        try:
            work = case.build(s.device, s.dtype)
        except Exception as exc:  # noqa: BLE001
            on_row({**base_row(case, "*", "*", s), "status": "error", "reason": harness.short_error(exc)})
            continue
        for direction in case.directions:
            for row in run_direction(case, work, direction, variants, s, deadline):
                on_row(row)
        del work
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
