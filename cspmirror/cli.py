"""The ``cspmirror`` console script. Each subcommand lives in ``cspmirror/commands/<name>.py`` and
defines ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help. A command whose module is missing from this install is left out.
COMMANDS = {
    "info": "models (parameters, GMACs), devices and backends available",
    "check": "every available backend against the reference, with a short benchmark (the main job)",
    "train": "train a family member on CIFAR-10 or an ImageFolder tree",
    "eval": "top-1/top-5 and loss of a checkpoint on a dataset",
    "ablate": "a short-budget grid over the architecture knobs of SPEC §2",
    "bench": "kernel and model benchmarks, written under bench/results/<device>/",
}


DESCRIPTION = ("Tools for the CSPMirrorNet model family: model and backend information, backend checks, training, "
               "evaluation, ablations and benchmarks.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cspmirror", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"cspmirror.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cspmirror.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
