"""``cspmirror ablate``: train one short run per point of a knob grid and tabulate the results.

Examples::

    cspmirror ablate --synthetic --preset knobs --epochs 2 --output runs/ablate
    cspmirror ablate --data ~/data/cifar10 --grid "overlap=0,0.25,0.5;mirror=true,false" --epochs 5
    cspmirror ablate --data ~/data/cifar10 --grid "overlap=0,0.25,0.5;mirror=true,false" --epochs 5 --resume

Writes ``ablation.csv``, ``ablation.md`` and ``ablation.png`` to ``--output`` (each run's own folder under
``--output/runs``).
"""

from __future__ import annotations

import argparse

from ..train import cli_args
from ..train.ablation import ABLATION_FILES, PRESETS, parse_grid, start_ablation
from ..train.data import AUTO
from ..train.engine import DEFAULT_MODEL, DEFAULT_RECIPE, TrainConfig
from ..train.plots import matplotlib_available

DEFAULT_EPOCHS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("grid")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--grid", default=None, metavar="SPEC",
                       help='cartesian product, e.g. "overlap=0,0.25;mirror=true,false;split_stages=all,none"')
    which.add_argument("--preset", choices=sorted(PRESETS), default="knobs",
                       help="a named list of points (default knobs: one knob at a time)")
    g.add_argument("--synthetic", action="store_true", help="use the synthetic dataset (no files needed)")
    cli_args.add_data_arguments(parser)
    cli_args.add_model_arguments(parser)
    cli_args.add_recipe_arguments(
        parser, help_for=dict(epochs=f"number of epochs of each point (default {DEFAULT_EPOCHS}, whatever the recipe)"))
    cli_args.add_runtime_arguments(parser)
    parser.set_defaults(epochs=DEFAULT_EPOCHS)
    g = parser.add_argument_group("run")
    g.add_argument("--output", default="runs/ablate",
                   help="folder for the table, the plot and the runs (default runs/ablate); when it holds an "
                        "ablation already, the next free OUTPUT2, OUTPUT3, ... (see --exist-ok)")
    cli_args.add_exist_ok_argument(g)
    g.add_argument("--resume", action="store_true",
                   help="go on with the ablation in --output, cut short, given the same grid and flags (checked: "
                        "recipe, knobs, seed, image size, step caps): points it finished are read from their "
                        "runs, the one it was training goes on from its last.pt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps-per-epoch", "--limit-train-batches", dest="max_steps_per_epoch", type=int,
                   default=None, help="cap optimizer steps per epoch")
    g.add_argument("--limit-val-batches", dest="max_val_batches", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    if args.synthetic:
        if args.data is not None or args.data_format not in (AUTO, "synthetic"):  # (auto: the default)
            return cli_args.fail("ablate", ValueError("--synthetic generates its data: leave out --data and "
                                                      "--data-format (or leave out --synthetic)"))
        args.data_format = "synthetic"
    try:
        output = resumed_folder(args.output) if args.resume else cli_args.new_run_folder(
            args.output, ABLATION_FILES, args.exist_ok)
        points = parse_grid(args.grid) if args.grid is not None else PRESETS[args.preset]
        base = TrainConfig(
            output=output, data=cli_args.data_config(args), model=args.model or DEFAULT_MODEL,
            model_kwargs=cli_args.model_knobs(args), recipe=args.recipe or DEFAULT_RECIPE,
            recipe_overrides=cli_args.recipe_overrides(args), device=args.device, backend=args.backend,
            channels_last=args.channels_last, seed=args.seed, max_steps_per_epoch=args.max_steps_per_epoch,
            max_val_batches=args.max_val_batches, progress=args.progress,
        )
        # every point's knobs, and the data, device, backend and recipe, before the first point trains
        ablation = start_ablation(base, points, output, resume=args.resume)
    except cli_args.CONFIG_ERRORS as exc:
        return cli_args.fail("ablate", exc)
    rows = ablation.run()
    if not ablation.ctx.is_main:
        return 0
    width = max(len(r["label"]) for r in rows)
    print(f"\n{'point':<{width}}  val top-1")
    for r in rows:
        print(f"{r['label']:<{width}}  {r['val_acc']:6.2f}%")
    print(f"table{' and plot' if matplotlib_available() else ''} in {output}")
    return 0


def resumed_folder(output: str) -> str:
    """``output``, checked to hold an ablation to go on with (a mistyped folder would start one afresh)."""
    if not cli_args.run_files_in(output, ABLATION_FILES):
        raise FileNotFoundError(f"--resume: {output!r} (--output) holds no ablation to go on with")
    return output
