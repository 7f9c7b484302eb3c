"""CPU benchmark of the C++ extension backend beside the reference, side by side in one run.

Run as ``python -m bench.bench_extension_cpu`` (``--quick`` for a smoke run, ``--no-compile`` to skip
``torch.compile``). Writes ``bench/results/cpu/extension.json`` and ``extension.md``.

Cases (fp32, the issue's targets): ``mirror_split`` and ``mirror_fuse`` at [8, 128, 56, 56] (>= 2x the
reference), ``bn_mish`` forward + backward in training mode at the same shape (>= 1.3x), and cspmirrornet53
inference at batch 4, 224 x 224: the extension with BN folded (``fuse_for_inference(backend="extension")``)
against the unfused reference model in eval mode (>= 1.25x), beside ``torch.compile`` of that reference and the
reference with BN folded. The split and fuse cases also time a copy of the same bytes (each input read once,
each output written once): how close the extension comes to this machine's copy bandwidth, and so how much
faster than the reference any implementation could be. The candidates of a case run interleaved, round after
round, so that load from other processes on a shared machine hits them alike; medians and their ratios are
reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import cspmirror
from bench.harness import environment, time_limit
from cspmirror import ops
from cspmirror.ops import extension
from cspmirror.ops._validate import split_width

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
SHAPE = (8, 128, 56, 56)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, dict]:
    """Median, 20th and 80th percentile (ms) of each function, timed in alternation.

    Every other round runs the candidates in reverse order: what one candidate leaves in the caches (or
    evicts from them) then falls on each of the others alike, instead of always on the one after it.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for round_index in range(rounds):
        for name, fn in (order if round_index % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=5) if len(values) > 1 else values * 4
        out[name] = {"median_ms": statistics.median(values), "p20_ms": q[0], "p80_ms": q[3], "rounds": rounds}
    return out


COPY = "copy (same bytes)"


def copy_of(num_bytes: int) -> Callable[[], object]:
    """A fresh-output copy that reads and writes ``num_bytes // 2`` bytes each: the op's memory traffic (each
    input read once, each output written once) at the machine's copy bandwidth."""
    src = torch.empty(num_bytes // 2, dtype=torch.uint8).random_(0, 255)
    return src.clone


def split_case() -> dict[str, Callable[[], object]]:
    x = torch.randn(SHAPE)
    y_bytes = 2 * x.nbytes * split_width(SHAPE[-1], 0.25) // SHAPE[-1]
    fns = {b: (lambda b=b: ops.mirror_split(x, 0.25, -1, True, backend=b)) for b in ("reference", "extension")}
    return {**fns, COPY: copy_of(x.nbytes + y_bytes)}


def fuse_case() -> dict[str, Callable[[], object]]:
    n, c, h, w = SHAPE
    parts = list(ops.mirror_split(torch.randn(n, c, h, w), 0.25).split(c // 2, dim=1))
    fns = {b: (lambda b=b: ops.mirror_fuse(parts, w, 0.25, -1, True, "sum", backend=b))
           for b in ("reference", "extension")}
    return {**fns, COPY: copy_of(sum(p.nbytes for p in parts) + 4 * n * c * h * w)}


def bn_mish_case() -> dict[str, Callable[[], object]]:
    c = SHAPE[1]
    x = torch.randn(SHAPE, requires_grad=True)
    weight = (torch.rand(c) + 0.5).requires_grad_()
    bias = torch.randn(c).requires_grad_()
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    grad = torch.randn(SHAPE)

    def step(backend: str) -> None:
        y = ops.bn_mish(x, weight, bias, running_mean, running_var, True, 0.1, 1e-5, backend=backend)
        torch.autograd.grad(y, (x, weight, bias), grad)

    return {b: (lambda b=b: step(b)) for b in ("reference", "extension")}


def model_case(compile_reference: bool, compile_timeout: float, size: int, batch: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = cspmirror.cspmirrornet53().eval()
    x = torch.randn(batch, 3, size, size)
    fused_ext = cspmirror.fuse_for_inference(copy.deepcopy(model), backend="extension")
    fused_ref = cspmirror.fuse_for_inference(copy.deepcopy(model), backend="reference")
    fns = {"reference": model, "extension (BN folded)": fused_ext, "reference (BN folded)": fused_ref}
    notes = {}
    if compile_reference:
        compiled = torch.compile(model)
        start = time.perf_counter()
        try:
            with torch.no_grad(), time_limit(compile_timeout):
                compiled(x)
            fns["torch.compile(reference)"] = compiled
            notes["compile_s"] = round(time.perf_counter() - start, 1)
        except Exception as exc:  # a compile past its budget, or one that fails here
            notes["compile_error"] = f"{type(exc).__name__}: {exc}"[:300]

    def run(module: torch.nn.Module) -> Callable[[], object]:
        def call() -> None:
            with torch.no_grad():
                module(x)

        return call

    with torch.no_grad():
        ref = model(x)
        for name, module in fns.items():
            err = ((module(x) - ref).norm() / ref.norm()).item()
            notes[f"rel_err[{name}]"] = err
    return {name: run(module) for name, module in fns.items()}, notes


def ratio_rows(times: dict[str, dict], baseline: str = "reference") -> dict[str, float]:
    base = times[baseline]["median_ms"]
    return {name: base / t["median_ms"] for name, t in times.items() if name != baseline}


def write_markdown(report: dict, path: Path) -> None:
    env = report["environment"]
    lines = [
        "# Extension backend on the CPU (side by side with the reference)",
        "",
        f"- CPU: {env['device_name']}; torch {env['torch']}; Python {env['python']}; {env['date']}",
        "- The machine was shared with other engineers' jobs while this ran: candidates were timed interleaved,",
        "  round after round (in reverse order every other round), and medians are reported; the ratios are the",
        "  signal, absolute times are noisy.",
        "",
        "| case | candidate | median ms | p20-p80 ms | speed-up vs reference | target | of copy bandwidth |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for case, result in report["cases"].items():
        copy = result["times"].get(COPY)
        for name, t in result["times"].items():
            ratio = result["speedup"].get(name) if name != COPY else None
            target = result.get("target", "") if name.startswith("extension") else ""
            of_copy = f"{copy['median_ms'] / t['median_ms']:.0%}" if copy and name != COPY else ""
            lines.append(
                f"| {case} | {name} | {t['median_ms']:.2f} | {t['p20_ms']:.2f}-{t['p80_ms']:.2f} | "
                f"{'' if ratio is None else f'{ratio:.2f}x'} | {target} | {of_copy} |"
            )
    for case, result in report["cases"].items():
        if result.get("notes"):
            lines += ["", f"Notes on {case}:", ""]
            lines += [f"- {key}: {value}" for key, value in result["notes"].items()]
            if "compile_s" in result["notes"]:
                lines.append("- compile_s is the first call of the compiled model in this run; TorchInductor's "
                             "on-disk cache, warm when this script ran before, can make it far shorter than a "
                             "cold compile.")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds and a small model input (smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference model")
    parser.add_argument("--compile-timeout", type=float, default=1800.0, help="seconds allowed to compile")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rounds, model_rounds = (3, 2) if args.quick else (25, 11)
    size = 64 if args.quick else 224

    cases: dict[str, dict] = {}
    specs = [("mirror_split [8,128,56,56] fp32", split_case, ">= 2x"),
             ("mirror_fuse [8,128,56,56] fp32", fuse_case, ">= 2x"),
             ("bn_mish fwd+bwd train [8,128,56,56] fp32", bn_mish_case, ">= 1.3x")]
    for name, make, target in specs:
        times = interleaved(make(), rounds, warmup=3)
        cases[name] = {"times": times, "speedup": ratio_rows(times), "target": target}
        print(name, {k: round(v, 2) for k, v in cases[name]["speedup"].items()}, flush=True)

    fns, notes = model_case(not args.no_compile, args.compile_timeout, size, batch=4)
    name = f"cspmirrornet53 eval, batch 4, {size}x{size} fp32"
    times = interleaved(fns, model_rounds, warmup=1)
    cases[name] = {"times": times, "speedup": ratio_rows(times), "target": ">= 1.25x", "notes": notes}
    print(name, {k: round(v, 2) for k, v in cases[name]["speedup"].items()}, notes, flush=True)

    report = {"environment": environment("cpu"), "torch_threads": torch.get_num_threads(),
              "extension": extension.status().reason, "shared_machine": True, "cases": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "extension.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / "extension.md")
    print(f"wrote {args.out / 'extension.json'} and extension.md")


if __name__ == "__main__":
    main()
