"""Short-budget ablations over the architecture knobs of SPEC §2.

A *point* is a dict of model knobs (``{}`` is the baseline). :func:`parse_grid` turns a spec such as
``"overlap=0,0.25;mirror=true,false"`` into the cartesian product of the listed values; :data:`PRESETS`
hold named lists of points. :func:`run_ablation` trains each point with the same recipe, seed and data
(:func:`~cspmirror.train.engine.fit`, one sub-folder per point under ``OUTPUT/runs``) and writes
``ablation.csv``, ``ablation.md`` and ``ablation.png`` (final validation accuracy per point).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from .cli_args import parse_split_stages, resolve_knobs
from .engine import TrainConfig, fit
from .history import markdown_table, write_csv
from .plots import plot_bars

ABLATION_CSV = "ablation.csv"
ABLATION_MD = "ablation.md"
ABLATION_PNG = "ablation.png"
COLUMNS = ("label", "params_m", "val_acc", "best_val_acc", "val_loss", "train_acc", "train_loss", "time_s")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {options}, got {text!r}")
        return text

    return parse


# knob -> parser of one value (split_stages: all | none | indices joined by '+', e.g. 0+1).
KNOB_PARSERS: dict[str, Callable[[str], object]] = {
    "overlap": float,
    "mirror": _parse_bool,
    "siamese": _parse_bool,
    "reduce": _choice("sum", "mean"),
    "fusion": _choice("sum_concat", "concat_first"),
    "axis": int,
    "split_stages": lambda text: parse_split_stages(text),
}

PRESETS: dict[str, list[dict]] = {
    # one knob at a time, away from the baseline
    "knobs": [{}, {"overlap": 0.0}, {"mirror": False}, {"siamese": False}, {"reduce": "mean"},
              {"fusion": "concat_first"}, {"split_stages": []}],
    # the paper's three ideas: horizontal expansion (split), Siamese weights, fusion order
    "paper": [{}, {"split_stages": []}, {"siamese": False}, {"fusion": "concat_first"}],
    "overlap": [{"overlap": v} for v in (0.0, 0.125, 0.25, 0.5, 1.0)],
}


def parse_grid(spec: str) -> list[dict]:
    """``"knob=v1,v2;knob2=v3"`` -> the cartesian product as a list of dicts, in spec order.

    Raises ValueError naming the knob for an unknown knob or a bad value.
    """
    axes: list[tuple[str, list]] = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"grid item {item!r} must look like knob=value1,value2")
        if name not in KNOB_PARSERS:
            raise ValueError(f"unknown knob {name!r} in --grid; known: {sorted(KNOB_PARSERS)}")
        try:
            parsed = [KNOB_PARSERS[name](v.strip()) for v in values.split(",")]
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bad value for knob {name!r} in --grid: {exc}") from None
        axes.append((name, parsed))
    if not axes:
        raise ValueError(f"--grid {spec!r} names no knob")
    names = [n for n, _ in axes]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))]


def point_label(point: dict) -> str:
    """``baseline`` for ``{}``, else ``knob=value, ...``."""
    def show(key: str, value: object) -> str:
        if key == "split_stages":
            value = "none" if not value else ("all" if value is None else "+".join(map(str, value)))
        return f"{key}={value}"

    return ", ".join(show(k, v) for k, v in point.items()) or "baseline"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")[:60]


def run_ablation(base: TrainConfig, points: Sequence[dict], output: str | Path) -> list[dict]:
    """Train ``base`` once per point (its knobs over ``base.model_kwargs``); returns one row per point and
    writes the CSV, markdown and PNG under ``output``."""
    output = Path(output)
    rows = []
    for i, point in enumerate(points):
        label = point_label(point)
        knobs = resolve_knobs(base.model, {**base.model_kwargs, **point})
        cfg = dataclasses.replace(base, model_kwargs=knobs, resume=None,
                                  output=str(output / "runs" / f"{i:02d}-{_slug(label)}"))
        if base.verbose:
            print(f"[{i + 1}/{len(points)}] {label}")
        result = fit(cfg)
        last = result.history[-1]
        rows.append(dict(label=label, params_m=result.num_params / 1e6, val_acc=last["val_acc"],
                         best_val_acc=max(r["val_acc"] for r in result.history), val_loss=last["val_loss"],
                         train_acc=last["train_acc"], train_loss=last["train_loss"],
                         time_s=sum(r["time"] for r in result.history)))
    write_report(rows, output, base)
    return rows


def write_report(rows: Sequence[dict], output: Path, base: TrainConfig) -> None:
    """``ablation.csv``, ``ablation.md`` (with the budget) and ``ablation.png`` under ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    write_csv(rows, output / ABLATION_CSV, COLUMNS)
    budget = (f"model `{base.model}`, data `{base.data.format}`, recipe `{base.recipe}` with overrides "
              f"{base.recipe_overrides or '{}'}, max steps/epoch {base.max_steps_per_epoch}, seed {base.seed}")
    text = f"# Ablation\n\n{budget}\n\nAccuracies in %, `val_acc` after the last epoch.\n\n"
    (output / ABLATION_MD).write_text(text + markdown_table(rows, COLUMNS))
    plot_bars([r["label"] for r in rows], [r["val_acc"] for r in rows], output / ABLATION_PNG,
              xlabel="validation top-1 (%) after the budget", title=f"{base.model}: knob ablation")
