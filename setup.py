"""Build script for cspmirror.

The Triton kernels live in the top-level ``kernels/`` folder and install as ``cspmirror.kernels``.
The C++/CUDA extension in ``csrc/`` is optional. A plain ``pip install -e .`` compiles nothing: the extension is
then built just in time on first use (see ``cspmirror/ops/extension.py``). To build it ahead of time as
``cspmirror._C``::

    CSPMIRROR_BUILD_EXT=1 pip install --no-build-isolation -e .

(torch must be importable during the build, hence ``--no-build-isolation``). The CUDA kernels are included when
torch is a CUDA build, nvcc is found (``CUDA_HOME``) and ``CSPMIRROR_BUILD_CUDA`` is not ``0``; set
``TORCH_CUDA_ARCH_LIST`` (e.g. ``"9.0"``) to compile for chosen GPUs only. ``CSPMIRROR_CPU_FLAGS`` overrides the
CPU vector flags (see ``csrc/build_config.py``).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent

# kernels/ and csrc/ sit at the top of the repository and install inside the package: cspmirror/kernels (the
# Triton kernels, a subpackage) and cspmirror/csrc (the extension's sources, data for its just-in-time build).
packages = find_packages(include=["cspmirror", "cspmirror.*"]) + ["cspmirror.kernels", "cspmirror.csrc"]


def extension_build() -> dict:
    """The setup() keywords that build ``cspmirror._C``; none unless ``CSPMIRROR_BUILD_EXT=1``."""
    if os.environ.get("CSPMIRROR_BUILD_EXT", "0") in ("", "0"):
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise RuntimeError(
            "CSPMIRROR_BUILD_EXT=1 needs torch in the build environment: "
            "pip install --no-build-isolation -e ."
        ) from exc
    spec = importlib.util.spec_from_file_location("cspmirror_build_config", HERE / "csrc" / "build_config.py")
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    with_cuda = (
        os.environ.get("CSPMIRROR_BUILD_CUDA", "1") != "0"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists()
    )
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    module = make(
        "cspmirror._C",
        [os.path.relpath(source, HERE) for source in config.sources(with_cuda)],
        define_macros=[("CSPMIRROR_PYTHON_MODULE", None)],
        extra_compile_args={"cxx": config.cxx_flags(with_cuda), "nvcc": config.nvcc_flags()},
        extra_link_args=config.ld_flags(),
    )
    return {"ext_modules": [module], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    packages=packages,
    package_dir={"cspmirror.kernels": "kernels", "cspmirror.csrc": "csrc"},
    package_data={"cspmirror": ["yolo/*.yaml"], "cspmirror.csrc": ["*.cpp", "*.cu", "*.h"]},
    **extension_build(),
)
