"""``cspmirror check``: every available backend against the reference on this machine, then a short
benchmark. The first thing to run on a new machine.

Correctness follows SPEC §4: ``mirror_split`` / ``mirror_fuse`` bit-exact against the reference in the same
dtype; ``bn_mish`` and ``conv_bn_mish`` against the reference in float64 (fp32: fixed bounds; bf16/fp16:
twice PyTorch's own error in that dtype, + 1e-6), forward and, where the op has one, backward; fresh random
inputs; ``out=`` buffers poisoned with NaN (and the rest of the buffer checked untouched); fp32 with TF32
off. On a machine without CUDA, Triton runs in its CPU interpreter: ``TRITON_INTERPRET=1`` must be set before
triton is first imported, so when something imported it already (``torch.utils.flop_counter`` does), the
check re-runs itself in a fresh process with the variable set. Results print as they come (and go to
``--json`` after each), then a short benchmark. Exit code 1 when any available backend FAILs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..devices import parse_device

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
FAST_BACKENDS = ("triton", "extension")
OVERLAP = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto: cuda when present)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated (fp32, bf16, fp16)")
    parser.add_argument("--backends", default=",".join(FAST_BACKENDS), help="fast backends to check")
    parser.add_argument("--only", default=None, help="only checks whose op or case contains this text")
    parser.add_argument("--no-bench", action="store_true", help="skip the short benchmark")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: fresh each run)")


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Problem:
    """One call of an op: its float64 tensors by name and how to call it.

    ``call(tensors, backend, out=None)``; ``grad``: tensors the backward differentiates (empty: no
    backward); ``state``: tensors the op updates in place (running stats); ``fp32``: 1-D tensors that stay
    fp32 for half dtypes (BatchNorm's, as ``nn.BatchNorm2d``'s); ``out_shape`` and ``out_offset``: when
    set, the output is written into channels ``out_offset:`` of a NaN-poisoned larger buffer.
    """

    tensors: dict[str, torch.Tensor]
    call: Callable[..., torch.Tensor]
    grad: tuple[str, ...] = ()
    state: tuple[str, ...] = ()
    fp32: tuple[str, ...] = ()
    out_shape: tuple[int, ...] | None = None
    out_offset: int = 3


@dataclass(frozen=True)
class Check:
    """One row of the check table: ``make(size, gen)`` draws the float64 inputs for ``size`` = (N, C, H, W).

    ``exact``: bit-exact against the reference in the same dtype; else fp32 within ``fwd_tol`` /
    ``bwd_tol`` of float64 and half dtypes within twice PyTorch's own error. ``bench``: timed in the short
    benchmark (one case per op).
    """

    op: str
    case: str
    make: Callable[[tuple[int, int, int, int], torch.Generator], Problem] = field(compare=False, repr=False)
    exact: bool = False
    fwd_tol: float = 0.0
    bwd_tol: float = 0.0
    bench: bool = False


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def _ragged(c: int) -> int:
    """Extra channels that make tiny check shapes ragged (masking is tested); none at benchmark sizes."""
    return 3 if c < 16 else 0


def _split_problem(axis: int, mirror: bool, channels_last: bool) -> Callable[..., Problem]:
    def make(size: tuple[int, int, int, int], gen: torch.Generator) -> Problem:
        from cspmirror import ops

        x = _randn(gen, *size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def call(t: dict, backend: str, out: torch.Tensor | None = None) -> torch.Tensor:
            return ops.mirror_split(t["x"], OVERLAP, axis, mirror, backend=backend)
        return Problem({"x": x}, call, grad=("x",))
    return make


def _fuse_problem(reduce: str, mirror: bool) -> Callable[..., Problem]:
    def make(size: tuple[int, int, int, int], gen: torch.Generator) -> Problem:
        from cspmirror import ops
        from cspmirror.ops._validate import split_width

        n, c, h, w = size
        p = split_width(w, OVERLAP)
        tensors = {"a": _randn(gen, 2 * n, c, h, p), "b": _randn(gen, 2 * n, c + _ragged(c), h, p)}

        def call(t: dict, backend: str, out: torch.Tensor | None = None) -> torch.Tensor:
            return ops.mirror_fuse([t["a"], t["b"]], w, OVERLAP, -1, mirror, reduce, backend=backend)
        return Problem(tensors, call, grad=("a", "b"))
    return make


def _bn_problem(training: bool, residual: bool, out: bool) -> Callable[..., Problem]:
    def make(size: tuple[int, int, int, int], gen: torch.Generator) -> Problem:
        from cspmirror import ops

        c = size[1]
        t = {"x": _randn(gen, *size) * 2 + 0.5, "weight": _rand(gen, c) + 0.5, "bias": _randn(gen, c) * 0.2,
             "running_mean": _randn(gen, c) * 0.1, "running_var": _rand(gen, c) + 0.5}
        if residual:
            t["residual"] = _randn(gen, *size)

        def call(t: dict, backend: str, out: torch.Tensor | None = None) -> torch.Tensor:
            return ops.bn_mish(t["x"], t["weight"], t["bias"], t["running_mean"], t["running_var"], training,
                               0.1, 1e-5, t.get("residual"), out=out, backend=backend)
        grad = tuple(k for k in ("x", "weight", "bias", "residual") if k in t) if training and not out else ()
        return Problem(t, call, grad=grad, state=("running_mean", "running_var") if training else (),
                       fp32=("weight", "bias", "running_mean", "running_var"), out_shape=size if out else None)
    return make


def _conv_problem(kernel: int, stride: int, residual: bool, out: bool) -> Callable[..., Problem]:
    def make(size: tuple[int, int, int, int], gen: torch.Generator) -> Problem:
        from cspmirror import ops

        n, c, h, w = size
        c_out, pad = 2 * c + _ragged(c), kernel // 2
        out_shape = (n, c_out, (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1)
        t = {"x": _randn(gen, *size), "weight": _randn(gen, c_out, c, kernel, kernel) / math.sqrt(c * kernel ** 2),
             "bias": _randn(gen, c_out) * 0.2}
        if residual:
            t["residual"] = _randn(gen, *out_shape)

        def call(t: dict, backend: str, out: torch.Tensor | None = None) -> torch.Tensor:
            return ops.conv_bn_mish(t["x"], t["weight"], t["bias"], stride, t.get("residual"), out=out,
                                    backend=backend)
        return Problem(t, call, out_shape=out_shape if out else None)
    return make


CHECKS: tuple[Check, ...] = (
    Check("mirror_split", "W, mirror", _split_problem(-1, True, False), exact=True, bench=True),
    Check("mirror_split", "H, no mirror, channels_last", _split_problem(-2, False, True), exact=True),
    Check("mirror_fuse", "2 parts, sum", _fuse_problem("sum", True), exact=True, bench=True),
    Check("mirror_fuse", "mean, no mirror", _fuse_problem("mean", False), exact=True),
    Check("bn_mish", "train", _bn_problem(True, False, False), fwd_tol=1e-5, bwd_tol=1e-4, bench=True),
    Check("bn_mish", "train + residual", _bn_problem(True, True, False), fwd_tol=1e-5, bwd_tol=1e-4),
    Check("bn_mish", "train, out= channel slice", _bn_problem(True, False, True), fwd_tol=1e-5),
    Check("bn_mish", "eval + residual", _bn_problem(False, True, False), fwd_tol=1e-5),
    Check("conv_bn_mish", "3x3 s1 + residual", _conv_problem(3, 1, True, False), fwd_tol=1e-4, bench=True),
    Check("conv_bn_mish", "1x1 s1", _conv_problem(1, 1, False, False), fwd_tol=1e-4),
    Check("conv_bn_mish", "3x3 s2, out= channel slice", _conv_problem(3, 2, False, True), fwd_tol=1e-4),
)

TINY = (2, 4, 6, 9)                       # odd width: an odd split length and a real overlap
BENCH_SIZES = {"cuda": (16, 64, 64, 64), "cpu": (4, 32, 32, 32)}


# ---------------------------------------------------------------------------------------------- compare


@dataclass
class Result:
    backend: str
    op: str
    case: str
    dtype: str
    direction: str
    status: str          # PASS | FAIL | SKIP
    error: float | None = None
    bound: float | None = None
    reason: str = ""


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf when ``out`` has NaN or inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def cast(problem: Problem, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The problem's tensors in ``dtype`` on ``device`` (``problem.fp32`` ones stay fp32 for half dtypes),
    fresh leaves with ``requires_grad`` where the backward needs them."""
    out = {}
    for name, t in problem.tensors.items():
        d = torch.float32 if half(dtype) and name in problem.fp32 else dtype
        v = t.to(device=device, dtype=d).clone(memory_format=torch.preserve_format)
        out[name] = v.requires_grad_(name in problem.grad)
    return out


def forward(problem: Problem, tensors: dict[str, torch.Tensor], backend: str, poison: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The op's output, and the NaN-poisoned buffer it was written into (``poison`` and ``out_shape``)."""
    if not poison or problem.out_shape is None:
        return problem.call(tensors, backend), None
    shape = list(problem.out_shape)
    shape[1] += 2 * problem.out_offset
    x = tensors["x"]
    buffer = torch.full(shape, math.nan, device=x.device, dtype=x.dtype)
    view = buffer[:, problem.out_offset:problem.out_offset + problem.out_shape[1]]
    return problem.call(tensors, backend, view), buffer


def judge(fast: torch.Tensor, ref64: torch.Tensor, low: torch.Tensor, dtype: torch.dtype, exact: bool,
          fp32_tol: float, same_format: bool = False) -> tuple[bool, float, float, str]:
    """(passed, error, bound, message) for one tensor under SPEC §4; ``low`` is PyTorch's reference in
    ``dtype``; ``same_format``: the memory format must match the reference's too (op outputs)."""
    fast, ref64, low = fast.detach(), ref64.detach(), low.detach()
    if fast.shape != ref64.shape:
        return False, math.inf, 0.0, f"shape {tuple(fast.shape)} != reference {tuple(ref64.shape)}"
    if fast.dtype != low.dtype:
        return False, math.inf, 0.0, f"dtype {fast.dtype} != reference {low.dtype}"
    if exact:
        if not torch.equal(fast, low):
            diff = float((fast.double() - low.double()).abs().nan_to_num(math.inf).max())
            return False, diff, 0.0, f"not bit-exact: max abs diff {diff:.3g}"
        if same_format and fast.is_contiguous() != low.is_contiguous():
            return False, 0.0, 0.0, "memory format differs from the reference's"
        return True, 0.0, 0.0, ""
    err = rel_err(fast, ref64)
    bound = fp32_tol if not half(dtype) else 2 * rel_err(low, ref64) + 1e-6
    return err <= bound, err, bound, "" if err <= bound else f"rel err {err:.3g} > {bound:.3g}"


def verdict(direction: str, judged: list[tuple[str, tuple[bool, float, float, str]]], row: Callable) -> Result:
    """One Result from several judged tensors: the first failure, else the largest error."""
    for name, (ok, err, bound, msg) in judged:
        if not ok:
            return row(direction, "FAIL", error=err, bound=bound, reason=f"{name}: {msg}")
    _, (_, err, bound, _) = max(judged, key=lambda j: j[1][1] / j[1][2] if j[1][2] else j[1][1])
    return row(direction, "PASS", error=err, bound=bound)


def check_one(check: Check, backend: str, dtype: torch.dtype, device: torch.device,
              gen: torch.Generator) -> list[Result]:
    """Forward (output, running stats, poisoned buffer) and backward of one case for one backend/dtype."""
    problem = check.make(TINY, gen)
    name = str(dtype).removeprefix("torch.")

    def row(direction: str, status: str, **kw) -> Result:
        return Result(backend, check.op, check.case, name, direction, status, **kw)

    fast, low = cast(problem, dtype, device), cast(problem, dtype, device)
    # The float64 reference runs on the very values the fast path gets (rounded to dtype), as the tests do:
    # the errors compared are then the ops' own, not the rounding of the inputs that both share.
    ref = {k: v.detach().to(torch.float64).requires_grad_(v.requires_grad) for k, v in fast.items()}
    try:
        y, buffer = forward(problem, fast, backend, poison=True)
    except Exception as exc:  # noqa: BLE001
        return [skip_or_fail(row, "fwd", exc)]
    y_low, _ = forward(problem, low, "reference")
    y_ref, _ = forward(problem, ref, "reference")
    judged = [("out", judge(y, y_ref, y_low, dtype, check.exact, check.fwd_tol, same_format=True))]
    judged += [(k, judge(fast[k], ref[k], low[k], dtype, check.exact, check.fwd_tol)) for k in problem.state]
    if buffer is not None:
        start, stop = problem.out_offset, problem.out_offset + problem.out_shape[1]
        outside = torch.cat([buffer[:, :start], buffer[:, stop:]], dim=1)
        judged.append(("out=", (bool(torch.isnan(outside).all()), 0.0, 0.0, "wrote outside its channel slice")))
        judged.append(("out=", (y.data_ptr() == buffer[:, start:].data_ptr(), 0.0, 0.0,
                                "did not return the out= tensor")))
    results = [verdict("fwd", judged, row)]
    if problem.grad:
        dy = _randn(gen, *y_ref.shape).to(device=device, dtype=y.dtype).to(torch.float64)  # exact in y's dtype
        try:
            g_fast = torch.autograd.grad(y, [fast[k] for k in problem.grad], dy.to(y.dtype))
        except Exception as exc:  # noqa: BLE001
            return results + [skip_or_fail(row, "bwd", exc)]
        g_low = torch.autograd.grad(y_low, [low[k] for k in problem.grad], dy.to(y_low.dtype))
        g_ref = torch.autograd.grad(y_ref, [ref[k] for k in problem.grad], dy)
        judged = [(f"d{k}", judge(a, c, b, dtype, check.exact, check.bwd_tol))
                  for k, a, b, c in zip(problem.grad, g_fast, g_low, g_ref, strict=True)]
        results.append(verdict("bwd", judged, row))
    return results


def skip_or_fail(row: Callable, direction: str, exc: BaseException) -> Result:
    """SKIP when ``exc`` says the backend cannot do this here, FAIL for anything else."""
    from cspmirror.backends import BackendUnavailableError

    text = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    if isinstance(exc, (BackendUnavailableError, ImportError, NotImplementedError)):
        return row(direction, "SKIP", reason=text)
    return row(direction, "FAIL", reason=text)


# ------------------------------------------------------------------------------------------------ bench


def bench_rows(device: torch.device, dtype: torch.dtype, available: list[str], interpreted: bool,
               only: str | None) -> list[dict]:
    """Median time of the reference and each available fast backend on one case per op (small shapes)."""
    from torch.utils import benchmark

    size = BENCH_SIZES["cuda" if device.type == "cuda" else "cpu"]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for check in CHECKS:
        if not check.bench or (only and only not in f"{check.op} {check.case}"):
            continue
        problem = check.make(size, gen)
        tensors = {k: v.detach() for k, v in cast(problem, dtype, device).items()}
        row = {"op": check.op, "case": check.case, "shape": "x".join(map(str, size))}
        for backend in ["reference", *available]:
            if backend == "triton" and interpreted:
                row[backend] = "interpreter: not timed"
                continue
            try:
                with torch.no_grad():
                    problem.call(tensors, backend)
                    timer = benchmark.Timer("call(tensors, backend)",
                                            globals={"call": problem.call, "tensors": tensors, "backend": backend})
                    row[backend] = timer.blocked_autorange(min_run_time=0.2).median * 1e3
            except Exception as exc:  # noqa: BLE001
                row[backend] = f"{type(exc).__name__}"
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """SPEC §4's fp32 conv bound (1e-4) is for tf32 off."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


RESULT_COLUMNS = (("backend", 9), ("op", 12), ("case", 27), ("dtype", 8), ("dir", 3), ("result", 6),
                  ("rel err", 8), ("bound", 8), ("reason", 0))


def result_line(r: Result | None = None) -> str:
    """One fixed-width line of the result table (the header when ``r`` is None): rows print as they come,
    so a check cut short by a timeout still shows what it found."""
    if r is None:
        cells = [name for name, _ in RESULT_COLUMNS]
    else:
        exact = r.status == "PASS" and r.bound == 0.0
        err = "" if r.error is None else ("exact" if exact else f"{r.error:.2e}")
        bound = "" if r.bound in (None, 0.0) else f"{r.bound:.2e}"
        cells = [r.backend, r.op, r.case, r.dtype, r.direction, r.status, err, bound, r.reason]
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, RESULT_COLUMNS, strict=True)).rstrip()


def bench_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    return fmt_table(["op", "case", "shape", *[f"{c} ms" for c in columns]],
                     [[r["op"], r["case"], r["shape"], *[cell(r.get(c, "")) for c in columns]] for r in rows])


def to_argv(args: argparse.Namespace) -> list[str]:
    """The command line that gives ``args`` back (for a re-run in a fresh process)."""
    argv = ["--dtypes", args.dtypes, "--backends", args.backends]
    for flag, value in (("--device", args.device), ("--only", args.only), ("--json", args.json),
                        ("--seed", args.seed)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--no-bench"] if args.no_bench else [])


def use_interpreter() -> bool:
    """Set ``TRITON_INTERPRET=1`` (no CUDA here). Returns False when that came too late for this process.

    Triton decorates its own helpers (``tl.sum``'s combine functions and the like) when it is imported, in
    the mode the environment says then; ``torch.utils.flop_counter`` imports triton, so a process that has
    already imported it runs reductions in the interpreter with compiled-mode helpers, which fails.
    """
    if "TRITON_INTERPRET" in os.environ:
        return True
    os.environ["TRITON_INTERPRET"] = "1"
    return "triton" not in sys.modules


def all_results(wanted: list[str], statuses: dict, checks: list[Check], dtypes: list[torch.dtype],
                device: torch.device, gen: torch.Generator) -> Iterator[Result]:
    """Every (backend, check, dtype) result as it is computed; one SKIP per unavailable backend."""
    from cspmirror.backends import BackendUnavailableError, ensure_loaded

    for backend in wanted:
        status = statuses.get(backend)
        if status is None or not status.available:
            yield Result(backend, "*", "*", "*", "*", "SKIP", reason=status.reason if status else "unknown backend")
            continue
        try:  # the extension builds here on first use: a failed build of an "available" backend is a FAIL
            ensure_loaded(backend)
        except BackendUnavailableError as exc:
            yield Result(backend, "*", "*", "*", "*", "FAIL", reason=f"did not load: {error_line(str(exc))}")
            continue
        for check in checks:
            for dtype in dtypes:
                yield from check_one(check, backend, dtype, device, gen)


def error_line(text: str) -> str:
    """The line of a (build) log that says what went wrong: the last one naming an error, else the last one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    return next((line for line in reversed(lines) if "error" in line.lower()), lines[-1])[:300]


def argument_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags (one line naming the flag), or None."""
    from cspmirror.backends import BACKENDS

    try:
        parse_device(args.device)
    except ValueError as exc:
        return str(exc)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPE_NAMES for d in dtypes):
        return f"argument --dtypes: expected a comma-separated list of {sorted(DTYPE_NAMES)}, got {args.dtypes!r}"
    known = [b for b in BACKENDS if b != "auto"]
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not wanted or any(b not in known for b in wanted):
        return f"argument --backends: expected a comma-separated list of {known}, got {args.backends!r}"
    if args.json is not None and args.json.is_dir():
        return f"argument --json: {str(args.json)!r} is a folder; give a file path"
    if args.only and not any(args.only in f"{c.op} {c.case}" for c in CHECKS):
        return f"argument --only: no check matches {args.only!r}"
    if args.seed is not None:
        try:
            torch.Generator().manual_seed(args.seed)
        except (ValueError, RuntimeError) as exc:
            return f"argument --seed: {args.seed} cannot seed a torch.Generator ({exc})"
    return None


def run(args: argparse.Namespace) -> int:
    error = argument_error(args)
    if error:
        print(f"cspmirror check: error: {error}", file=sys.stderr)
        return 2
    device = parse_device(args.device)
    if not torch.cuda.is_available() and not use_interpreter():
        print("(re-running in a fresh process with TRITON_INTERPRET=1: triton was imported before it was set)",
              flush=True)
        return subprocess.call([sys.executable, "-m", "cspmirror", "check", *to_argv(args)])
    from cspmirror import backends

    t0 = time.perf_counter()
    dtypes = [DTYPE_NAMES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    print(f"cspmirror check on {device} ({_device_name(device)}), torch {torch.__version__}")
    statuses = {s.name: s for s in backends.all_statuses(device)}
    for s in statuses.values():
        print(f"  {s}")
    interpreted = backends.triton_interpreted()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    checks = [c for c in CHECKS if not args.only or args.only in f"{c.op} {c.case}"]
    report = Report(args.json, {"device": str(device), "device_name": _device_name(device),
                                "torch": torch.__version__, "statuses": {k: str(v) for k, v in statuses.items()}})
    print(f"\nCorrectness against the reference (SPEC §4), seed {seed} (--seed {seed} repeats these inputs):")
    print(result_line(), flush=True)
    with tf32_off():
        for r in all_results(wanted, statuses, checks, dtypes, device, gen):
            print(result_line(r), flush=True)
            report.add(r)
    counts = report.counts()
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.perf_counter() - t0:.0f} s")
    available = [b for b in wanted if statuses.get(b) and statuses[b].available]
    if not args.no_bench:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        report.bench = bench_rows(device, dtype, available, interpreted, args.only)
        report.save()
        print(f"\nShort benchmark ({str(dtype).removeprefix('torch.')}, median ms; `python -m bench` for more):")
        print(bench_table(report.bench, ["reference", *available]))
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 1 if counts["FAIL"] else 0


class Report:
    """The results so far, rewritten to ``path`` (when given) after each one, so a check cut short by a
    timeout still leaves its JSON."""

    def __init__(self, path: Path | None, header: dict):
        self.path, self.header = path, header
        self.results: list[Result] = []
        self.bench: list[dict] = []
        if path:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SystemExit(f"cspmirror check: error: argument --json: cannot create {str(path.parent)!r} "
                                 f"({exc.strerror or exc})") from None
        self.save()

    def add(self, result: Result) -> None:
        self.results.append(result)
        self.save()

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in ("PASS", "FAIL", "SKIP")}

    def save(self) -> None:
        if self.path:
            data = {**self.header, "counts": self.counts(), "results": [asdict(r) for r in self.results],
                    "bench": self.bench}
            # Written after every result: atomically, so that a run stopped mid-write leaves the last whole one.
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.path)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

