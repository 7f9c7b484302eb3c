"""Importing this module makes ``cspmirror.kernels`` importable when cspmirror runs from a source checkout."""

import importlib.util
import os
import sys

_PACKAGE = __name__.rpartition(".")[0]


def _find_kernels() -> None:
    """Make ``cspmirror.kernels`` importable from a source checkout.

    An install maps the top-level ``kernels/`` folder to ``cspmirror.kernels`` (``package_dir``). When this
    package is imported straight from a checkout instead (the repository on ``sys.path``, or a legacy
    ``setup.py develop`` install), that mapping is absent: register ``../kernels`` under the same name.
    Nothing is executed but the folder's ``__init__`` (a docstring): triton is still imported lazily.
    """
    if importlib.util.find_spec(_PACKAGE + ".kernels") is not None:
        return
    init = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(
        _PACKAGE + ".kernels", init, submodule_search_locations=[os.path.dirname(init)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    sys.modules[_PACKAGE].kernels = module


_find_kernels()

