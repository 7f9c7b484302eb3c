"""The benchmark runner behind ``python -m bench`` and ``cspmirror bench``.

    python -m bench --suite {ops,models,compare,all} [--device cuda|cpu] [--dtype bf16|fp32|fp16] [--quick]
                    [--out DIR] [--budget SECONDS] [--only TEXT] [--variants a,b] [--report-only]

Results go to ``bench/results/<device-slug>/`` by default: ``<suite>.json`` (rewritten after every row),
then ``results.json``, ``<suite>.csv``, ``results.md`` and PNG charts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from cspmirror.devices import parse_device

from . import harness, report

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=("ops", "models", "compare", "all"), default="all")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto: cuda when present)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="ops/compare dtype; models: only this dtype (default: bf16 on GPU, fp32 on CPU; "
                             "models on GPU: bf16 then fp32)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<device>)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: cases that would start later are recorded as skipped")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this text")
    parser.add_argument("--variants", default=None,
                        help="ops: comma-separated variants (reference,eager_cbm,compile,triton,extension,copy)")
    parser.add_argument("--max-layers", type=int, default=None, help="ops: at most this many conv layers")
    parser.add_argument("--compile-layers", type=int, default=None,
                        help="ops: conv layers that also get the torch.compile baseline (default 3 GPU, 1 CPU)")
    parser.add_argument("--no-compile", action="store_true", help="leave out every torch.compile variant")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 gives steadier numbers on a shared CPU)")
    parser.add_argument("--no-report", action="store_true",
                        help="write only <suite>.json (the report is rebuilt later with --report-only)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild results.json/CSV/MD/PNG from the <suite>.json files in --out")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are off anyway when stderr is not a terminal)")


def resolve_device(name: str | None) -> torch.device:
    """:func:`cspmirror.devices.parse_device` for the bench tools: SystemExit with its message."""
    try:
        return parse_device(name)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def check_arguments(args: argparse.Namespace) -> None:
    """SystemExit with a one-line message naming the flag, for values the suites would misread."""
    from .variants import VARIANTS

    for flag, value, least in (("--threads", args.threads, 1), ("--max-layers", args.max_layers, 0),
                               ("--compile-layers", args.compile_layers, 0)):
        if value is not None and value < least:
            raise SystemExit(f"argument {flag}: expected an integer >= {least}, got {value}")
    if args.budget is not None and not args.budget > 0:
        raise SystemExit(f"argument --budget: expected a number of seconds > 0, got {args.budget}")
    if args.variants:
        known = (*VARIANTS, "copy")
        bad = [v for v in args.variants.split(",") if v.split("[")[0] not in known]
        if bad:
            raise SystemExit(f"argument --variants: unknown {bad}; known: {','.join(known)}")
    if args.report_only and args.no_report:
        raise SystemExit("argument --no-report: not allowed with --report-only")


def notes(device: torch.device) -> list[str]:
    """What a reader of the numbers should know about how they were taken."""
    if device.type == "cuda":
        return ["CUDA-event timing; torch.backends.cudnn.benchmark=True",
                "conv 'compile' = torch.compile(mode='max-autotune-no-cudagraphs') of conv2d+batch_norm+mish, "
                "only on the representative layers; other ops' 'compile' = torch.compile of the reference"]
    return ["wall-clock timing on the CPU; the machine may be shared with other jobs, so spreads matter",
            "Triton is not timed on the CPU: it runs there only in its interpreter (a correctness tool)",
            "peak memory is not measured on the CPU; 'saved-act MiB' counts the tensors autograd saves",
            "'compile' = torch.compile (default mode, inductor C++ backend) of the reference"]


class Recorder:
    """Collects a suite's rows and rewrites ``<suite>.json`` after each, so a killed run keeps its rows. Nothing
    is written before the first row: a suite with no case to run (``--only``) leaves an earlier file as it was."""

    def __init__(self, out: Path, suite: str, meta: dict):
        self.out, self.suite, self.meta, self.rows = out, suite, meta, []

    def __call__(self, row: dict) -> None:
        self.rows.append(row)
        if self.suite == "ops":
            from .ops_suite import derive
            derive(self.rows)
        report.save_suite(self.out, self.suite, self.meta, self.rows)


def run_ops(args: argparse.Namespace, device: torch.device, meta: dict, deadline: harness.Deadline) -> bool:
    from . import ops_suite
    from .cases import op_cases, shapes_for

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    compile_layers = args.compile_layers if args.compile_layers is not None else (3 if device.type == "cuda" else 1)
    max_layers = args.max_layers if args.max_layers is not None else (None if device.type == "cuda" else
                                                                      (4 if args.quick else 8))
    variants = args.variants.split(",") if args.variants else None
    settings = ops_suite.settings_for(device, dtype, args.quick, variants, compile=not args.no_compile)
    meta = {**meta, "options": {**meta["options"], "dtype": str(dtype).removeprefix("torch."),
                                "compile_layers": compile_layers, "max_layers": max_layers}}
    meta["ceilings"] = ops_suite.ceilings(device, dtype, args.quick)
    cases = [c for c in op_cases(shapes_for(device, args.quick), max_layers, compile_layers)
             if not args.only or args.only in c.name]
    recorder = Recorder(args.out, "ops", meta)
    ops_suite.run(cases, settings, deadline, recorder, progress=not args.no_progress)
    return bool(recorder.rows)


def run_models(args: argparse.Namespace, device: torch.device, meta: dict, deadline: harness.Deadline) -> bool:
    from . import models_suite

    plan = models_suite.plan_for(device, args.quick, (DTYPES[args.dtype],) if args.dtype else None)
    if args.no_compile:
        plan = dataclasses.replace(plan, compiled_modes=())
    meta = {**meta, "options": {**meta["options"], "model": plan.model, "resolution": plan.resolution}}
    recorder = Recorder(args.out, "models", meta)
    models_suite.run(plan, device, deadline, recorder, not args.no_progress, args.only)
    return bool(recorder.rows)


def run_compare(args: argparse.Namespace, device: torch.device, meta: dict, deadline: harness.Deadline) -> bool:
    from . import compare_suite

    plan = compare_suite.plan_for(device, args.quick, DTYPES[args.dtype] if args.dtype else None)
    meta = {**meta, "options": {**meta["options"], "batch": plan.batch, "resolution": plan.resolution,
                                "dtype": str(plan.dtype).removeprefix("torch.")}}
    recorder = Recorder(args.out, "compare", meta)
    compare_suite.run(plan, device, deadline, recorder, not args.no_progress, args.only)
    return bool(recorder.rows)


RUNNERS = {"ops": run_ops, "models": run_models, "compare": run_compare}


def run(args: argparse.Namespace) -> int:
    """Run the chosen suites, then write the reports; returns a process exit code."""
    check_arguments(args)
    device = resolve_device(args.device)
    if args.out is None:
        args.out = RESULTS_ROOT / harness.device_slug(device)
    args.out = Path(args.out)
    if not args.report_only:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        meta = {**harness.environment(device), "notes": notes(device),
                "options": {"quick": args.quick, "budget_s": args.budget, "no_compile": args.no_compile,
                            "torch_threads": torch.get_num_threads()}}
        deadline = harness.Deadline(args.budget)
        suites = list(RUNNERS) if args.suite == "all" else [args.suite]
        ran = False  # whether any suite had a case to run
        for suite in suites:
            t0 = time.perf_counter()
            try:
                ran |= RUNNERS[suite](args, device, meta, deadline)
            except harness.CaseTimeout as exc:
                ran = True
                print(f"{suite}: {exc}")
            print(f"{suite}: {time.perf_counter() - t0:.0f} s")
        if not ran:  # (only --only can leave every suite without a case)
            raise SystemExit(f"argument --only: no case of --suite {args.suite} matches {args.only!r}")
    if args.no_report:
        return 0
    written = report.write_all(args.out)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"no <suite>.json results in {args.out}: nothing to report", file=sys.stderr)
    return 0 if written else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
