"""``cspmirror bench``: the benchmark runner of the repository's ``bench/`` folder (``python -m bench``).

The benchmarks live beside the package, not in it (they are not installed with a wheel): this command
finds them in the source checkout that an editable install points at, or on ``sys.path``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

_MISSING = ("the benchmarks are not part of this install: run `cspmirror bench` from a source checkout "
            "(pip install -e .), or `python -m bench` from the repository root")


def _runner() -> ModuleType | None:
    """``bench.runner``, from ``sys.path`` or from the checkout this package was imported from."""
    checkout = Path(__file__).resolve().parents[2]
    try:
        return importlib.import_module("bench.runner")
    except ImportError:
        if not (checkout / "bench" / "runner.py").is_file():
            return None
    sys.path.insert(0, str(checkout))
    sys.modules.pop("bench", None)
    return importlib.import_module("bench.runner")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    runner = _runner()
    if runner is None:
        parser.description = f"{parser.description} ({_MISSING})"
        return
    runner.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    runner = _runner()
    if runner is None:
        print(_MISSING, file=sys.stderr)
        return 2
    return runner.run(args)
