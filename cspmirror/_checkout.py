"""Importing this module makes ``cspmirror.kernels`` importable when cspmirror runs from a source checkout."""

import importlib.util
import os
import sys

_PACKAGE = __name__.rpartition(".")[0]


def _find_kernels() -> None:
    """Make ``cspmirror.kernels`` importable from a source checkout, and the checkout's own.

    An install maps the top-level ``kernels/`` folder to ``cspmirror.kernels`` (``package_dir``). When this
    package is imported straight from a checkout instead (the repository on ``sys.path``, or a legacy
    ``setup.py develop`` install), that mapping is absent: register ``../kernels`` under the same name. An
    editable install of another checkout maps the name to that checkout's folder; the kernels next to this
    package win then, so one checkout's Python never runs another's kernels. Nothing is executed but the
    folder's ``__init__`` (a docstring): triton is still imported lazily.
    """
    package_dir = os.path.dirname(os.path.abspath(__file__))
    init = os.path.join(os.path.dirname(package_dir), "kernels", "__init__.py")
    found = importlib.util.find_spec(_PACKAGE + ".kernels")
    if found is not None and (not os.path.isfile(init) or _is_within(found.origin, package_dir)
                              or _is_within(found.origin, os.path.dirname(init))):
        return
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(
        _PACKAGE + ".kernels", init, submodule_search_locations=[os.path.dirname(init)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    sys.modules[_PACKAGE].kernels = module


def _is_within(path: str | None, folder: str) -> bool:
    return path is not None and os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)

_find_kernels()

