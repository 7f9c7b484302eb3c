"""Command-line flags shared by ``cspmirror train``, ``eval`` and ``ablate``, and their translation into
:class:`~cspmirror.train.data.DataConfig`, model knobs and recipe overrides.

Flags that override something default to ``None`` ("not given"), so that model-config and recipe
defaults stay in one place (the dataclasses) and resuming can tell what was given explicitly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from ..backends import BACKENDS, BackendUnavailableError
from ..models import MODEL_CONFIGS, list_models
from .data import AUTO, FORMATS, DataConfig
from .engine import DEFAULT_MODEL, DEFAULT_RECIPE
from .recipes import FIELD_CHOICES, FIELD_HELP, RECIPES, recipe_fields


def add_data_arguments(parser: argparse.ArgumentParser, workers: int = 2) -> None:
    g = parser.add_argument_group("data (read from local disk only; nothing is downloaded)")
    g.add_argument("--data", default=None, metavar="ROOT",
                   help="dataset folder: ROOT/cifar-10-batches-py/... (cifar10) or ROOT/train, ROOT/val "
                        "(imagefolder)")
    g.add_argument("--data-format", choices=FORMATS, default=AUTO,
                   help="auto (default: cifar10 or imagefolder, whichever ROOT holds), cifar10 (the pickled python "
                        "batches), imagefolder, or synthetic (generated, for smoke tests)")
    g.add_argument("--image-size", type=int, default=None,
                   help="input size (default 32 for cifar10/synthetic, 224 for imagefolder; eval and train "
                        "--resume: the checkpoint's)")
    g.add_argument("--workers", type=int, default=workers, help=f"data-loader processes (default {workers})")
    g.add_argument("--synthetic-classes", type=int, default=4, help="classes of the synthetic data")
    g.add_argument("--synthetic-train", type=int, default=512, help="training images of the synthetic data")
    g.add_argument("--synthetic-val", type=int, default=128, help="validation images of the synthetic data")


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(format=args.data_format, root=args.data, image_size=args.image_size, workers=args.workers,
                      synthetic_classes=args.synthetic_classes, synthetic_train=args.synthetic_train,
                      synthetic_val=args.synthetic_val)


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="fused-op backend (default auto)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (they are off anyway when stderr is not a terminal)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (knobs default to the model's config)")
    g.add_argument("--model", choices=list_models(), default=None,
                   help=f"default {DEFAULT_MODEL} (on train --resume: the checkpoint's)")
    g.add_argument("--overlap", type=unit_float, default=None, help="split overlap in [0, 1] (default 0.25)")
    g.add_argument("--axis", type=int, choices=(-1, -2), default=None, help="split axis: -1 width, -2 height")
    g.add_argument("--no-mirror", dest="mirror", action="store_const", const=False, default=None,
                   help="do not flip the second part")
    g.add_argument("--no-siamese", dest="siamese", action="store_const", const=False, default=None,
                   help="two weight sets, one per part")
    g.add_argument("--reduce", choices=("sum", "mean"), default=None, help="overlap reduction")
    g.add_argument("--fusion", choices=("sum_concat", "concat_first"), default=None, help="fusion order")
    g.add_argument("--split-stages", type=parse_split_stages, default=None, metavar="all|none|I,J,..",
                   help="which stages split (0-based indices), default all")


def unit_float(text: str) -> float:
    """A float in [0, 1] (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def parse_split_stages(text: str) -> list[int] | None:
    """``all`` -> None (the config default), ``none`` -> [], ``0,2`` -> [0, 2]."""
    text = text.strip().lower()
    if text == "all":
        return None
    if text == "none":
        return []
    try:
        indices = [int(t) for t in text.replace("+", ",").split(",") if t.strip()]
    except ValueError:
        indices = []
    if not indices:  # an empty value (e.g. a grid's trailing comma) is not "none"
        raise argparse.ArgumentTypeError(f"--split-stages must be all, none or indices like 0,1; got {text!r}")
    return indices


def model_knobs(args: argparse.Namespace) -> dict:
    """The model knobs given on the command line (the others keep the config's defaults)."""
    names = ("overlap", "axis", "mirror", "siamese", "reduce", "fusion", "split_stages")
    return resolve_knobs(args.model or DEFAULT_MODEL, {k: getattr(args, k, None) for k in names})


def resolve_knobs(model: str, knobs: dict) -> dict:
    """``knobs`` without ``None`` values, with ``split_stages`` as one bool per stage of ``model``."""
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if "split_stages" in knobs:
        n = len(MODEL_CONFIGS[model].stages)
        chosen = list(knobs["split_stages"])
        bad = [i for i in chosen if isinstance(i, bool) or not -n <= i < n]
        if bad:
            raise ValueError(f"split_stages (--split-stages) indices must be in [0, {n}) for {model}, got {bad}")
        chosen = {i % n for i in chosen}
        knobs["split_stages"] = [i in chosen for i in range(n)]
    return knobs


def add_recipe_arguments(parser: argparse.ArgumentParser, help_for: dict[str, str] | None = None) -> None:
    """``--recipe`` plus one flag per :class:`~cspmirror.train.recipes.Recipe` field (``help_for``: a field's
    help text where a command sets its own default)."""
    g = parser.add_argument_group("recipe (every field overrides the preset)")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="paper: the paper's CIFAR-10 recipe; modern: augmentation, cosine, label smoothing, AMP "
                        f"(default {DEFAULT_RECIPE}; on train --resume: the checkpoint's)")
    for name, kind, default in recipe_fields():
        flag = "--" + name.replace("_", "-")
        text = (help_for or {}).get(name) or (
            f"{FIELD_HELP[name]} (paper: {default}, modern: {getattr(RECIPES['modern'], name)})")
        text = text.replace("%", "%%")  # argparse formats help texts with %
        if kind is bool:
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            g.add_argument(flag, dest=name, type=kind, default=None, choices=FIELD_CHOICES.get(name), help=text)


def recipe_overrides(args: argparse.Namespace) -> dict:
    """The recipe fields given on the command line."""
    return {name: getattr(args, name) for name, _, _ in recipe_fields() if getattr(args, name) is not None}


# What a wrong configuration raises before anything trains (RecipeError is a ValueError; a missing dataset or
# checkpoint a FileNotFoundError): the commands print these as one-line errors.
CONFIG_ERRORS = (ValueError, FileNotFoundError, BackendUnavailableError)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)


def add_exist_ok_argument(group: argparse._ArgumentGroup) -> None:
    """``--exist-ok``: write into an ``--output`` folder that holds a run already (see :func:`new_run_folder`)."""
    group.add_argument("--exist-ok", action="store_true",
                       help="write into --output even when it holds a run (its files are overwritten); without it, "
                            "such a folder is left alone and the run goes to the next free OUTPUT2, OUTPUT3, ...")


def run_files_in(folder: str | Path, run_files: Iterable[str]) -> list[str]:
    """Those of ``run_files`` (the names a run writes in its folder) that ``folder`` holds."""
    return [name for name in run_files if (Path(folder) / name).exists()]


def _taken(folder: Path, run_files: Iterable[str]) -> bool:
    """Whether a new run cannot go to ``folder``: it holds a run, or it is a file (no folder can be made there)."""
    return (folder.exists() and not folder.is_dir()) or bool(run_files_in(folder, run_files))


def new_run_folder(output: str, run_files: Iterable[str], exist_ok: bool = False) -> str:
    """The folder a new run writes to: ``output`` when it holds no run (none of ``run_files``, the names a run
    writes there: an empty or unrelated folder is used as it is) or ``exist_ok``, else its first numbered sibling
    that holds none and is no file: ``runs/train`` -> ``runs/train2``, ``runs/train3``, ... (as Ultralytics'
    ``increment_path``). Says so on rank 0 when the folder changes."""
    names = tuple(run_files)
    path = Path(output)
    base = path if path.name not in ("", "..") else path.resolve()  # "." and ".." have no name to number
    found = run_files_in(path, names)
    if exist_ok or not found:
        return output
    n = 2
    while _taken(base.with_name(f"{base.name}{n}"), names):
        n += 1
    chosen = str(base.with_name(f"{base.name}{n}"))
    if os.environ.get("RANK", "0") == "0":  # (under torchrun every process decides alike; one says it)
        print(f"{output} holds a run already ({', '.join(found)}): this one goes to {chosen} "
              f"(--exist-ok to write into {output})")
    return chosen


def fail(command: str, exc: BaseException) -> int:
    """Print ``exc`` as a one-paragraph error (no traceback) and return the exit code 2."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = f" (rank {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""  # under torchrun
    print(f"cspmirror {command}: error{rank}: {exc}", file=sys.stderr)
    return 2
