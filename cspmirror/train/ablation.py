"""Short-budget ablations over the architecture knobs of SPEC §2.

A *point* is a dict of model knobs (``{}`` is the baseline). :func:`parse_grid` turns a spec such as
``"overlap=0,0.25;mirror=true,false"`` into the cartesian product of the listed values; :data:`PRESETS`
hold named lists of points. :func:`run_ablation` trains each point with the same recipe, seed and data
(:func:`~cspmirror.train.engine.fit`, one sub-folder per point under ``OUTPUT/runs``) and writes
``ablation.csv``, ``ablation.md`` and ``ablation.png`` (final validation accuracy per point; the PNG only when
matplotlib is installed). It is :func:`start_ablation` (every point's knobs checked, the first run prepared,
so a bad configuration fails before anything trains) followed by :meth:`Ablation.run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..models import MODEL_CONFIGS, configure
from . import distributed
from .checkpointing import LAST, RESUME_KEYS, load_checkpoint_dict
from .cli_args import parse_split_stages, resolve_knobs
from .data import resolve_format
from .distributed import DistContext
from .engine import DEFAULT_RECIPE, FitResult, PreparedRun, TrainConfig, finished_result, prepare
from .history import markdown_table, write_csv
from .plots import matplotlib_available, note_no_matplotlib, plot_bars
from .recipes import Recipe, get_recipe

ABLATION_CSV = "ablation.csv"
ABLATION_MD = "ablation.md"
ABLATION_PNG = "ablation.png"
RUNS = "runs"  # the points' run folders
# What an ablation writes in its folder: a folder holding any of them holds an ablation (a new one goes elsewhere).
ABLATION_FILES = (ABLATION_CSV, ABLATION_MD, ABLATION_PNG, RUNS)
COLUMNS = ("label", "params_m", "val_acc", "best_val_acc", "val_loss", "train_acc", "train_loss", "time_s")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


# knob -> parser of one value (split_stages: all | none | indices joined by '+', e.g. 0+1). They only parse:
# whether a value fits the model (an overlap in [0, 1], a stage index, ...) is checked in one place, for grid and
# preset points alike, by point_knobs (the model's own checks).
KNOB_PARSERS: dict[str, Callable[[str], object]] = {
    "overlap": float,
    "mirror": _parse_bool,
    "siamese": _parse_bool,
    "reduce": str,
    "fusion": str,
    "axis": int,
    "split_stages": parse_split_stages,
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

    Raises ValueError naming the knob for an unknown knob or a value that does not parse; whether a value fits
    the model is :func:`point_knobs`'s check.
    """
    axes: list[tuple[str, list]] = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"grid item {item!r} must look like knob=value1,value2")
        if name not in KNOB_PARSERS:
            raise ValueError(f"unknown knob {name!r} in --grid; known: {sorted(KNOB_PARSERS)}")
        if name in (n for n, _ in axes):  # a later item would silently replace the earlier one's values
            raise ValueError(f"knob {name!r} is given twice in --grid; list all its values once: {name}=v1,v2")
        try:
            parsed = [KNOB_PARSERS[name](v.strip()) for v in values.split(",")]
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
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
            value = "all" if value is None else ("none" if not value else "+".join(map(str, value)))
        return f"{key}={value}"

    return ", ".join(show(k, v) for k, v in point.items()) or "baseline"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")[:60]


def point_knobs(model: str, base_knobs: dict, point: dict) -> dict:
    """The model knobs of ``point`` over ``base_knobs`` (``split_stages`` as one bool per stage; ``all``, i.e.
    None, is the config's default), checked as the model checks them: ValueError naming the point and knob."""
    try:
        knobs = {**base_knobs, **resolve_knobs(model, point)}
        if "split_stages" in point and point["split_stages"] is None:
            knobs.pop("split_stages", None)
        configure(MODEL_CONFIGS[model], **knobs)  # checks every knob (the model's own checks)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"ablation point {point_label(point)!r}: {exc}") from None
    return knobs


def point_configs(base: TrainConfig, points: Sequence[dict], output: str | Path,
                  resume: bool = False) -> list[TrainConfig]:
    """One training configuration per point: ``base`` with the point's knobs (:func:`point_knobs`) and its own
    folder under ``output/runs``; with ``resume``, a point whose folder holds a ``last.pt`` goes on from it."""
    output = Path(output)
    configs = []
    for i, point in enumerate(points):
        folder = output / RUNS / f"{i:02d}-{_slug(point_label(point))}"
        last = folder / LAST if resume and (folder / LAST).is_file() else None
        configs.append(dataclasses.replace(base, model_kwargs=point_knobs(base.model, base.model_kwargs, point),
                                           resume=str(last) if last else None, output=str(folder)))
    return configs


@dataclass
class Ablation:
    """An ablation whose points are checked and whose first run is prepared (:func:`start_ablation`).

    Under ``torchrun`` every point trains in the one process group ``ctx`` joined for the whole ablation:
    leaving and re-joining per point could pair a fast process with rank 0's old, not yet closed, store.
    """

    base: TrainConfig
    points: list[dict]
    configs: list[TrainConfig]
    output: Path
    first: PreparedRun | None  # the first point that trains, prepared
    ctx: DistContext = DistContext()
    finished: dict[int, FitResult] = dataclasses.field(default_factory=dict)  # resumed points with no epoch left

    def run(self) -> list[dict]:
        """Train every point; returns one row per point and writes the CSV, markdown and PNG under ``output``
        (rank 0 only) after each point, so that an ablation cut short keeps the table of the points it finished;
        then leaves the process group if :func:`start_ablation` joined it."""
        with distributed.leaving(self.ctx):
            rows: list[dict] = []
            for i in range(len(self.points)):
                rows.append(self._train_point(i))
                if self.ctx.is_main:
                    write_report(rows, self.output, self.base, len(self.points))
            return rows

    def _prepared(self, i: int) -> PreparedRun:
        """Point ``i``'s run: the one :func:`start_ablation` prepared when it is that point's (once), else a new one."""
        if self.first is not None and self.first.cfg.output == self.configs[i].output:
            run, self.first = self.first, None
            return run
        return prepare(self.configs[i])

    def _train_point(self, i: int) -> dict:
        label = point_label(self.points[i])
        result = self.finished.get(i)
        if self.base.verbose and self.ctx.is_main:
            print(f"[{i + 1}/{len(self.points)}] {label}" + (" (finished: read from its run)" if result else ""))
        if result is None:
            result = self._prepared(i).train()
        last = result.history[-1]
        return dict(label=label, params_m=result.num_params / 1e6, val_acc=last["val_acc"],
                    best_val_acc=max(r["val_acc"] for r in result.history), val_loss=last["val_loss"],
                    train_acc=last["train_acc"], train_loss=last["train_loss"],
                    time_s=sum(r["time"] for r in result.history))


def start_ablation(base: TrainConfig, points: Sequence[dict], output: str | Path, resume: bool = False) -> Ablation:
    """Check every point's knobs (:func:`point_knobs`), join the process group if a launcher describes one,
    and prepare the first run (:func:`~cspmirror.train.engine.prepare`: data, device, backend, recipe), so
    that a bad configuration raises here, before anything trains. With ``resume`` (an ablation cut short, run
    again with the same settings), points whose run folder holds a ``last.pt`` go on from it, and those it has
    finished are read from it, each checked to be trained as the grid and flags say (:func:`_differences`)."""
    if not points:
        raise ValueError("an ablation needs at least one point")
    base = dataclasses.replace(base, data=resolve_format(base.data))  # once, and the report names the format found
    configs = point_configs(base, points, output, resume)
    finished = {i: result for i, cfg in enumerate(configs) if cfg.resume and (result := _resumed_result(cfg))}
    ctx, _ = distributed.setup(base.device)
    with distributed.leaving(ctx, on_success=False):
        first = next((prepare(cfg) for i, cfg in enumerate(configs) if i not in finished), None)
    return Ablation(base, list(points), configs, Path(output), first, ctx, finished)


def _resumed_result(cfg: TrainConfig) -> FitResult | None:
    """For a point going on from its ``last.pt``: the run's result when it has no epoch left, else None.
    ValueError naming every :func:`_differences` of the checkpoint from the grid and flags."""
    ckpt = load_checkpoint_dict(cfg.resume, RESUME_KEYS)
    differ = _differences(cfg, ckpt)
    if differ:
        raise ValueError(f"--resume: {cfg.resume} was trained otherwise than the grid and flags give "
                         f"({'; '.join(differ)}); go on with the grid and flags the ablation was started with")
    return finished_result(cfg, ckpt)


def _differences(cfg: TrainConfig, ckpt: dict) -> list[str]:
    """How the point's checkpoint was trained otherwise than ``cfg`` gives: any recipe field (``train --resume``
    lets flags change them), the model or any knob (the point's over the knob flags; ``train --resume`` checks only
    those given), the seed, the image size or a step cap. The points of one ablation train alike, or their
    accuracies do not compare (and a ``last.pt`` another ablation left in the folder would pass for this one's)."""
    args, saved_knobs = ckpt.get("args", {}), dict(ckpt["model_kwargs"])
    saved_recipe, given_recipe = Recipe(**ckpt["recipe"]), get_recipe(cfg.recipe or DEFAULT_RECIPE,
                                                                      **cfg.recipe_overrides)
    pairs = [(f"recipe field {f.name} (--{f.name.replace('_', '-')})", getattr(saved_recipe, f.name),
              getattr(given_recipe, f.name)) for f in dataclasses.fields(Recipe)]
    pairs += [("seed (--seed)", args.get("seed"), 0 if cfg.seed is None else cfg.seed),
              ("image size (--image-size)", ckpt.get("image_size"), cfg.data.size),
              ("--max-steps-per-epoch", args.get("max_steps_per_epoch"), cfg.max_steps_per_epoch),
              ("--limit-val-batches", args.get("max_val_batches"), cfg.max_val_batches)]
    differ = [f"{name} {saved} there, {given} now" for name, saved, given in pairs if saved != given]
    if ckpt["model_name"] != cfg.model or (configure(MODEL_CONFIGS[cfg.model], **saved_knobs)
                                           != configure(MODEL_CONFIGS[cfg.model], **cfg.model_kwargs)):
        differ.append(f"model {ckpt['model_name']} with knobs {saved_knobs} there, {cfg.model} with "
                      f"{cfg.model_kwargs} now")
    return differ


def run_ablation(base: TrainConfig, points: Sequence[dict], output: str | Path, resume: bool = False) -> list[dict]:
    """Train ``base`` once per point (its knobs over ``base.model_kwargs``); returns one row per point and
    writes the CSV, markdown and PNG under ``output``. Same as ``start_ablation(...).run()``."""
    return start_ablation(base, points, output, resume).run()


def write_report(rows: Sequence[dict], output: Path, base: TrainConfig, points: int | None = None) -> None:
    """``ablation.csv``, ``ablation.md`` (with the budget) and ``ablation.png`` (when matplotlib is installed)
    under ``output``; ``points``: how many the ablation has (the markdown says when ``rows`` are fewer)."""
    output.mkdir(parents=True, exist_ok=True)
    write_csv(rows, output / ABLATION_CSV, COLUMNS)
    budget = (f"model `{base.model}`, data `{base.data.format}`, recipe `{base.recipe}` with overrides "
              f"{base.recipe_overrides or '{}'}, max steps/epoch {base.max_steps_per_epoch}, "
              f"seed {base.seed or 0}, model knobs of every point (baseline included) {base.model_kwargs or '{}'}")
    text = f"# Ablation\n\n{budget}\n\nAccuracies in %, `val_acc` after the last epoch.\n\n"
    if points is not None and len(rows) < points:
        text += f"**{len(rows)} of {points} points finished so far.**\n\n"
    (output / ABLATION_MD).write_text(text + markdown_table(rows, COLUMNS))
    if not matplotlib_available():
        if base.verbose:
            note_no_matplotlib()
        return
    plot_bars([r["label"] for r in rows], [r["val_acc"] for r in rows], output / ABLATION_PNG,
              xlabel="validation top-1 (%) after the budget", title=f"{base.model}: knob ablation")
