"""Results on disk: one JSON per suite (rewritten after every row, so a run cut short keeps what it
measured), then the combined ``results.json``, a CSV per suite, ``results.md`` and PNG charts."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from .ops_suite import derive

SUITES = ("ops", "models", "compare")


# ------------------------------------------------------------------------------------------------ files


def save_suite(out: Path, suite: str, meta: dict, rows: list[dict]) -> Path:
    """Write ``<out>/<suite>.json`` (meta + rows) atomically."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{suite}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    tmp.replace(path)
    return path


def load_suites(out: Path) -> dict[str, dict]:
    """The suites found under ``out``: name -> {"meta": ..., "rows": [...]}."""
    found = {}
    for suite in SUITES:
        path = out / f"{suite}.json"
        if path.exists():
            found[suite] = json.loads(path.read_text())
    return found


# what every CSV row says about where and when it was measured (the JSON keeps all of ``meta``)
CSV_META = ("device_name", "torch", "triton", "date")


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    """``rows`` as CSV, each with the :data:`CSV_META` fields of ``meta`` as its last columns."""
    rows = [{**r, **{k: meta.get(k) for k in CSV_META}} for r in rows]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------- tables


def fmt(value: object, digits: int = 3) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


Column = tuple[str, Callable[[dict], object]]


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = [fmt(get(r)).replace("|", "/") for _, get in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _spread(r: dict) -> str | None:
    if r.get("status") != "ok":
        return None
    return f"{r['p20_ms']:.3g}–{r['p80_ms']:.3g}"


def _note(r: dict) -> str:
    return "" if r.get("status") == "ok" else f"{r.get('status', '').upper()}: {r.get('reason', '')}"


def _pct(v: float | None) -> str | None:
    return None if v is None else f"{100 * v:.0f}%"


def _times(v: float | None) -> str | None:
    return None if v is None else f"{v:.2f}x"


OPS_COLUMNS: list[Column] = [
    ("op", lambda r: r["op"]), ("dir", lambda r: r["direction"]), ("shape", lambda r: r["shape"]),
    ("variant", lambda r: r["variant"]), ("median ms", lambda r: r.get("median_ms")), ("p20–p80 ms", _spread),
    ("GB/s", lambda r: r.get("gbps")), ("of copy bw", lambda r: _pct(r.get("frac_copy"))),
    ("graph ms", lambda r: r.get("graph_ms")), ("of copy bw (graph)", lambda r: _pct(r.get("frac_copy_graph"))),
    ("TFLOP/s", lambda r: r.get("tflops")), ("vs compile", lambda r: _times(r.get("vs_compile"))),
    ("vs eager", lambda r: _times(r.get("vs_eager"))),
    ("vs compile (graph)", lambda r: _times(r.get("vs_compile_graph"))),
    ("vs eager (graph)", lambda r: _times(r.get("vs_eager_graph"))), ("1st call s", lambda r: r.get("first_call_s")),
    ("note", _note),
]
def model_variant(r: dict) -> str:
    """A models row's variant: backend, ``+compile``, ``+ckpt`` (gradient checkpointing)."""
    return (f"{r.get('backend')}{'+compile' if r.get('compiled') else ''}"
            f"{'+ckpt' if r.get('checkpointing') else ''}")


MODELS_COLUMNS: list[Column] = [
    ("model", lambda r: r["model"]), ("mode", lambda r: r["mode"]), ("variant", model_variant),
    ("dtype", lambda r: r["dtype"]), ("batch", lambda r: r.get("batch")),
    ("ms/step", lambda r: r.get("median_ms")), ("p20–p80 ms", _spread), ("img/s", lambda r: r.get("images_per_s")),
    ("peak MiB", lambda r: r.get("peak_mib")), ("saved-act MiB", lambda r: r.get("act_mib")),
    ("1st call s", lambda r: r.get("first_call_s")), ("note", _note),
]
COMPARE_COLUMNS: list[Column] = [
    ("model", lambda r: r["model"]), ("from", lambda r: r.get("source")),
    ("params (M)", lambda r: r.get("params_m")), ("GMACs @256", lambda r: r.get("gmacs_256")),
    ("batch", lambda r: r.get("batch")), ("train img/s", lambda r: r.get("images_per_s")),
    ("ms/step", lambda r: r.get("median_ms")), ("peak MiB", lambda r: r.get("peak_mib")),
    ("saved-act MiB", lambda r: r.get("act_mib")), ("note", _note),
]
COLUMNS = {"ops": OPS_COLUMNS, "models": MODELS_COLUMNS, "compare": COMPARE_COLUMNS}


def meta_lines(meta: dict) -> list[str]:
    line = (f"- device: **{meta.get('device_name')}** (`{meta.get('device')}`); torch {meta.get('torch')}, "
            f"triton {meta.get('triton')}, python {meta.get('python')}; {meta.get('date')}")
    lines = [line]
    if meta.get("load_avg_1m") is not None:
        lines.append(f"- load average (1 min) at the start: {meta['load_avg_1m']} on {meta.get('cpu')}")
    for key in ("cuda", "cudnn", "timm", "torchvision"):
        if meta.get(key):
            lines.append(f"- {key} {meta[key]}")
    for key in ("ceilings", "options"):
        if meta.get(key):
            lines.append(f"- {key}: " + ", ".join(f"{k}={fmt(v)}" for k, v in meta[key].items()))
    lines += [f"- note: {n}" for n in meta.get("notes", [])]
    return lines


SUITE_TITLES = {
    "ops": "Fused ops (median over repeats; GB/s counts each input read once and each output written once)",
    "models": "Models (training step = forward + cross-entropy + backward + SGD step; inference = fused, "
              "BN folded)",
    "compare": "Comparison with CSPDarknet53, ResNet-50, DenseNet-121 (training step, every model eager)",
}


SKIP_KEYS: dict[str, Callable[[dict], str]] = {
    "ops": lambda r: r.get("variant", "*"),
    "models": lambda r: f"{model_variant(r)} {r.get('mode')}",
    "compare": lambda r: r.get("model", "*"),
}


def skipped_lines(suite: str, rows: Sequence[dict]) -> list[str]:
    """One line per (what, reason) among the skipped rows, so the tables hold only what ran."""
    groups: dict[tuple[str, str], int] = {}
    for r in rows:
        if r.get("status") == "skip":
            key = (SKIP_KEYS[suite](r), r.get("reason", ""))
            groups[key] = groups.get(key, 0) + 1
    lines = [f"- `{what}` ({n} row{'s' if n > 1 else ''}): {reason}" for (what, reason), n in groups.items()]
    return ["Skipped:", "", *lines, ""] if lines else []


# The targets for the fast backends (GPU shapes): (ops, directions, metric, bound).
TARGETS = (
    (("mirror_split", "mirror_fuse"), ("fwd", "bwd"), "frac_copy", 0.85),
    (("mirror_split", "mirror_fuse"), ("fwd", "bwd"), "vs_compile", 1.5),
    (("bn_mish_train", "bn_mish_eval"), ("fwd", "bwd"), "frac_copy", 0.80),
    (("conv_bn_mish",), ("fwd",), "vs_eager", 1.2),
    (("conv_bn_mish",), ("fwd",), "vs_compile", 1.0),
)
METRIC_NAMES = {"frac_copy": "of copy bandwidth", "vs_compile": "speed-up vs torch.compile",
                "vs_eager": "speed-up vs eager", "frac_copy_graph": "of copy bandwidth, device time (CUDA graph)",
                "vs_compile_graph": "speed-up vs torch.compile, device time (CUDA graph)",
                "vs_eager_graph": "speed-up vs eager, device time (CUDA graph)"}
FAST = ("triton", "extension")


def weighted_speedup(mine: Sequence[dict], base: Sequence[dict], key: str = "median_ms") -> tuple[float | None, int]:
    """Speed-up of ``mine`` over ``base`` across conv layers, weighted by time in the model
    (sum(base_ms x count) / sum(ms x count)) over the layers both have a ``key`` time for; and how many
    layers that is."""
    by_shape = {r["shape"]: r for r in base if r.get(key)}
    pairs = [(by_shape[r["shape"]], r) for r in mine if r["shape"] in by_shape and r.get(key)]
    if not pairs:
        return None, 0
    num = sum(b[key] * b.get("count_in_model", 1) for b, _ in pairs)
    return num / sum(r[key] * r.get("count_in_model", 1) for _, r in pairs), len(pairs)


CONV_BASELINES = {"vs_eager": "eager_cbm", "vs_compile": "compile"}


def target_rows(ops_rows: Sequence[dict]) -> list[dict]:
    """One row per (fast variant, op, direction, metric) with the measured value against its target;
    convolutions are summarised over layers (time-weighted)."""
    ok = [r for r in ops_rows if r.get("status") == "ok"]
    variants = list(dict.fromkeys(r["variant"] for r in ok if r["variant"].split("[")[0] in FAST))

    def select(op: str, d: str, v: str) -> list[dict]:
        return [r for r in ok if r["op"] == op and r["direction"] == d and r["variant"] == v]

    def measured(op: str, d: str, v: str, metric: str) -> list[tuple[str, float | None, str, float | None]]:
        """(where, value, where on device time, value on device time): one per shape, or one over the conv
        layers (time-weighted)."""
        mine = select(op, d, v)
        if op != "conv_bn_mish":
            return [(r["shape"], r.get(metric), r["shape"], r.get(f"{metric}_graph")) for r in mine]
        if not mine:
            return []
        base = select(op, d, CONV_BASELINES[metric])
        (value, n), (graph_value, n_graph) = weighted_speedup(mine, base), weighted_speedup(mine, base, "graph_ms")
        return [(f"{n} layers, time-weighted", value, f"{n_graph} layers, time-weighted", graph_value)]

    out = []
    for ops_, directions, metric, bound in TARGETS:
        for v, op, d in ((v, op, d) for v in variants for op in ops_ for d in directions):
            for where, value, graph_where, graph_value in measured(op, d, v, metric):
                out.append({"variant": v, "op": op, "dir": d, "metric": METRIC_NAMES[metric], "where": where,
                            "target": bound, "measured": value, "met": None if value is None else value >= bound})
                if graph_value is not None:  # the same target on device time, where the rows have it
                    out.append({"variant": v, "op": op, "dir": d, "metric": METRIC_NAMES[f"{metric}_graph"],
                                "where": graph_where, "target": bound, "measured": graph_value,
                                "met": graph_value >= bound})
    return out


def targets_markdown(ops_rows: Sequence[dict]) -> str:
    rows = target_rows(ops_rows)
    if not rows:
        return "No fast backend was timed, so the issue's targets cannot be assessed here.\n"
    pct = {METRIC_NAMES["frac_copy"], METRIC_NAMES["frac_copy_graph"]}
    cols: list[Column] = [
        ("variant", lambda r: r["variant"]), ("op", lambda r: r["op"]), ("dir", lambda r: r["dir"]),
        ("metric", lambda r: r["metric"]), ("over", lambda r: r["where"]),
        ("target", lambda r: f"≥ {_pct(r['target']) if r['metric'] in pct else _times(r['target'])}"),
        ("measured", lambda r: (_pct if r["metric"] in pct else _times)(r["measured"])),
        ("met", lambda r: r["met"]),
    ]
    return markdown_table(rows, cols) + "\n"


def targets_caveat(meta: dict) -> list[str]:
    """The targets are set for the GPU shapes: say so when the numbers come from elsewhere."""
    if str(meta.get("device", "")).startswith("cuda") and not meta.get("options", {}).get("quick"):
        return []
    return ["The issue's targets are set for the GPU shapes; these numbers come from "
            f"{meta.get('device_name')}{' with --quick shapes' if meta.get('options', {}).get('quick') else ''}, "
            "so they only show where each backend stands here.", ""]


def markdown(suites: dict[str, dict]) -> str:
    parts = ["# cspmirror benchmark results", ""]
    if "ops" in suites:
        parts += ["## Issue targets (fast backends)", "", *targets_caveat(suites["ops"]["meta"]),
                  targets_markdown(suites["ops"]["rows"])]
    for suite, data in suites.items():
        shown = [r for r in data["rows"] if r.get("status") != "skip"]
        parts += [f"## {SUITE_TITLES[suite]}", "", *meta_lines(data["meta"]), ""]
        parts += [markdown_table(shown, COLUMNS[suite]), "", *skipped_lines(suite, data["rows"])]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- charts


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _title(meta: dict) -> str:
    return f"{meta.get('device_name')} · torch {meta.get('torch')} · triton {meta.get('triton')} · " \
           f"{str(meta.get('date', ''))[:10]}"


def _bar_group(row: dict) -> str:
    """The x-axis group of a memory-bound op's bar: op, direction and, for a channels_last case, its layout
    (each layout is a case of its own; sharing a position, one bar would hide the other)."""
    layout = "\nchannels_last" if row["shape"].endswith("channels_last") else ""
    return f"{row['op']}\n{row['direction']}{layout}"


def plot_ops(data: dict, path: Path) -> Path | None:
    """Roofline-style chart: achieved GB/s per op/direction and variant, against the copy of the same bytes
    (marker) and the large-copy ceiling (line); a second panel places the convolutions on a roofline."""
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    mem = [r for r in rows if r["op"] != "conv_bn_mish"]
    conv = [r for r in rows if r["op"] == "conv_bn_mish" and r["variant"] != "copy"]
    if not rows:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.2, 1]})
    groups = list(dict.fromkeys(_bar_group(r) for r in mem))
    variants = list(dict.fromkeys(r["variant"] for r in mem if r["variant"] != "copy"))
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        xs, ys = [], []
        for r in mem:
            if r["variant"] == v:
                xs.append(groups.index(_bar_group(r)) + (i - (len(variants) - 1) / 2) * width)
                ys.append(r["gbps"])
        ax1.bar(xs, ys, width, label=v)
    copies = [(groups.index(_bar_group(r)), r["gbps"]) for r in mem if r["variant"] == "copy"]
    if copies:
        ax1.scatter(*zip(*copies, strict=True), marker="_", s=900, color="k", zorder=3,
                    label="copy of the same bytes")
    ceil = data["meta"].get("ceilings", {})
    if ceil.get("copy_gbps"):
        ax1.axhline(ceil["copy_gbps"], color="gray", ls="--", lw=1, label="large-copy bandwidth")
    ax1.set_xticks(range(len(groups)), groups, fontsize=8)
    ax1.set_ylabel("achieved GB/s (minimum bytes)")
    ax1.set_title("memory-bound fused ops")
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4)
    _conv_roofline(ax2, conv, ceil)
    fig.suptitle(_title(data["meta"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _conv_roofline(ax, conv: list[dict], ceil: dict) -> None:
    ax.set_title("conv_bn_mish layers: roofline")
    if not conv:
        ax.text(0.5, 0.5, "no conv results", ha="center", transform=ax.transAxes)
        return
    for v in dict.fromkeys(r["variant"] for r in conv):
        pts = [(r["flops"] / r["bytes"], r["tflops"]) for r in conv if r["variant"] == v and r.get("tflops")]
        if pts:
            ax.scatter(*zip(*pts, strict=True), label=v, s=18)
    if ceil.get("copy_gbps") and ceil.get("matmul_tflops"):
        import numpy as np

        intensity = np.logspace(0, 4, 100)
        roof = np.minimum(ceil["copy_gbps"] * intensity / 1e3, ceil["matmul_tflops"])
        ax.plot(intensity, roof, "k--", lw=1, label="roof: copy bw, matmul rate")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / minimum byte)")
    ax.set_ylabel("TFLOP/s")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)


SOURCE_COLORS = {"cspmirror": "tab:blue", "timm": "tab:orange", "torchvision": "tab:green"}


def _bars(ax, labels: list[str], values: list[float | None], title: str, ylabel: str,
          colors: list[str] | None = None) -> None:
    ax.bar(range(len(labels)), [v or 0 for v in values], color=colors or "tab:blue")
    for i, v in enumerate(values):
        if v is None:
            ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)


def plot_models(data: dict, path: Path) -> Path | None:
    """Bars: images/s of each training / inference variant, and peak (GPU) or saved-activation memory."""
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, mode in zip(axes[:2], ("train", "infer"), strict=True):
        sel = [r for r in rows if r["mode"] == mode]
        labels = [f"{model_variant(r)} {r['dtype']} b{r['batch']}" for r in sel]
        _bars(ax, labels, [r["images_per_s"] for r in sel], f"{mode}: images/s", "images/s")
    train = [r for r in rows if r["mode"] == "train"]
    key = "peak_mib" if any(r.get("peak_mib") for r in train) else "act_mib"
    labels = [f"{model_variant(r)} {r['dtype']} b{r['batch']}" for r in train]
    _bars(axes[2], labels, [r.get(key) for r in train],
          "train: peak memory" if key == "peak_mib" else "train: saved activations", "MiB")
    fig.suptitle(f"{rows[0]['model']} · {_title(data['meta'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compare(data: dict, path: Path) -> Path | None:
    rows = [r for r in data["rows"] if r.get("params_m") is not None]
    if not rows:
        return None
    plt = _plt()
    panels = [("params_m", "parameters", "M"), ("gmacs_256", "GMACs at 256x256", "GMACs"),
              ("images_per_s", "training images/s", "images/s"),
              ("peak_mib" if any(r.get("peak_mib") for r in rows) else "act_mib", "training memory", "MiB")]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.8))
    labels = [r["model"] for r in rows]
    colors = [SOURCE_COLORS.get(r.get("source"), "tab:gray") for r in rows]
    for ax, (key, title, unit) in zip(axes, panels, strict=True):
        if key == "peak_mib":
            title += " (peak)"
        elif key == "act_mib":
            title += " (saved activations)"
        _bars(ax, labels, [r.get(key) for r in rows], title, unit, colors)
    batch = next((r.get("batch") for r in rows if r.get("batch")), "?")
    res = rows[0].get("resolution")
    fig.suptitle(f"training at batch {batch}, {res}x{res}, {rows[0].get('dtype')} (blue: cspmirror, orange: timm, "
                 f"green: torchvision) · {_title(data['meta'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = {"ops": ("ops_roofline.png", plot_ops), "models": ("models.png", plot_models),
         "compare": ("compare.png", plot_compare)}


def write_all(out: Path) -> list[Path]:
    """Combined JSON, CSVs, markdown and PNGs from every ``<suite>.json`` under ``out``."""
    suites = load_suites(out)
    if not suites:
        return []
    if "ops" in suites:
        derive(suites["ops"]["rows"])
    written = [out / "results.json"]
    written[0].write_text(json.dumps(suites, indent=1, default=str))
    for suite, data in suites.items():
        write_csv(out / f"{suite}.csv", data["rows"], data["meta"])
        written.append(out / f"{suite}.csv")
        name, plot = PLOTS[suite]
        try:
            png = plot(data, out / name)
        except Exception as exc:  # noqa: BLE001 - a chart must not cost the tables
            print(f"warning: could not draw {name}: {exc}")
            png = None
        if png:
            written.append(png)
    (out / "results.md").write_text(markdown(suites))
    written.append(out / "results.md")
    return written
