"""``python -m bench.summary``: the one-page summary of a ``bench/gpu_suite.sh`` run (``summary.md``).

Steps and their exit codes, the ``cspmirror check`` verdicts (failures listed), the issue's targets, and
the models and comparison tables; the full tables are in ``results.md`` inside the bundle.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import report


def steps_markdown(path: Path) -> str:
    """The tab-separated step log (name, state, seconds, exit code) as a table."""
    if not path.exists():
        return "(no step log)\n"
    rows = [dict(zip(("step", "state", "seconds", "exit code"), line.split("\t"), strict=False))
            for line in path.read_text().splitlines() if line.strip()]
    cols: list[report.Column] = [(k, lambda r, k=k: r.get(k)) for k in ("step", "state", "seconds", "exit code")]
    return report.markdown_table(rows, cols) + "\n"


def check_markdown(path: Path) -> str:
    if not path.exists():
        return "`cspmirror check` wrote no results (see its log).\n"
    try:
        data = json.loads(path.read_text())
        c = data["counts"]
    except (ValueError, KeyError) as exc:
        return f"`cspmirror check` left an unreadable {path.name} ({type(exc).__name__}: {exc}; see its log).\n"
    lines = [f"{c['PASS']} passed, {c['FAIL']} failed, {c['SKIP']} skipped on {data['device_name']} "
             f"(torch {data['torch']}).", ""]
    lines += [f"- {s}" for s in data["statuses"].values()]
    bad = [r for r in data["results"] if r["status"] != "PASS"]
    if bad:
        cols: list[report.Column] = [(k, lambda r, k=k: r.get(k)) for k in
                                     ("status", "backend", "op", "case", "dtype", "direction", "error", "bound",
                                      "reason")]
        lines += ["", report.markdown_table(bad[:60], cols)]
        if len(bad) > 60:
            lines.append(f"... and {len(bad) - 60} more")
    if data.get("bench"):
        cols = [(k, lambda r, k=k: r.get(k)) for k in data["bench"][0]]
        lines += ["", "Short benchmark (median ms):", "", report.markdown_table(data["bench"], cols)]
    return "\n".join(lines) + "\n"


def summary(results: Path, check_json: Path, steps: Path) -> str:
    suites = report.load_suites(results)
    meta = next(iter(suites.values()))["meta"] if suites else {}
    parts = ["# cspmirror GPU suite", ""]
    if meta:
        parts += report.meta_lines({k: meta.get(k) for k in ("device", "device_name", "torch", "triton", "python",
                                                             "date", "cuda", "cudnn")}) + [""]
    parts += ["## Steps", "", steps_markdown(steps), "## cspmirror check", "", check_markdown(check_json)]
    if "ops" in suites:
        ceilings = suites["ops"]["meta"].get("ceilings", {})
        parts += ["## Issue targets (fast backends)", "",
                  f"Measured ceilings: copy {report.fmt(ceilings.get('copy_gbps'))} GB/s, matmul "
                  f"{report.fmt(ceilings.get('matmul_tflops'))} TFLOP/s.", "",
                  *report.targets_caveat(suites["ops"]["meta"]), report.targets_markdown(suites["ops"]["rows"])]
    for suite in ("models", "compare"):
        if suite in suites:
            rows = [r for r in suites[suite]["rows"] if r.get("status") != "skip"]
            parts += [f"## {report.SUITE_TITLES[suite]}", "", report.markdown_table(rows, report.COLUMNS[suite]), "",
                      *report.skipped_lines(suite, suites[suite]["rows"])]
    parts += ["Full tables: `results.md` in `results.tar.gz` (also JSON, CSV, PNG and every step's log).", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="the bench results folder")
    parser.add_argument("--check", type=Path, required=True, help="cspmirror check --json output")
    parser.add_argument("--steps", type=Path, required=True, help="the suite's step log (TSV)")
    parser.add_argument("--out", type=Path, required=True, help="summary.md to write")
    args = parser.parse_args(argv)
    text = summary(args.results, args.check, args.steps)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
