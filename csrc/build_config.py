"""Build settings of the cspmirror_ext library, shared by ``setup.py`` (prebuilt ``cspmirror._C``) and
``cspmirror/ops/extension.py`` (just-in-time build).

Standard library only, so that ``setup.py`` can load this file by path before torch is importable.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CSRC = Path(__file__).resolve().parent
CPU_SOURCES = ("cspmirror_ops.cpp", "cpu_kernels.cpp")
CUDA_SOURCES = ("cuda_kernels.cu",)

# x86-64 features the CPU kernels profit from (their loops are plain C++ that the compiler vectorizes).
_X86_FEATURES = {"avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c"}


def host_isa_flags() -> list[str]:
    """``-mavx2 -mfma -mf16c`` when the build machine is x86-64 and has those features, else none.

    The library then runs only on such CPUs (every x86-64 server of the last decade). ``CSPMIRROR_CPU_FLAGS``
    overrides the choice: e.g. ``""`` for a portable build, ``"-march=native"`` for this machine only.
    """
    override = os.environ.get("CSPMIRROR_CPU_FLAGS")
    if override is not None:
        return override.split()
    if os.name == "nt" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    if all(feature in flags for feature in _X86_FEATURES):
        return list(_X86_FEATURES.values())
    return []


def openmp_flags() -> list[str]:
    """OpenMP, which ``at::parallel_for`` needs at compile time (without it the inline loop runs serially)."""
    if os.name == "nt":
        return ["/openmp"]
    if platform.system() == "Darwin":
        return ["-Xpreprocessor", "-fopenmp"]
    return ["-fopenmp"]


def cxx_flags(with_cuda: bool) -> list[str]:
    """Host compiler flags: optimised, OpenMP, the CPU's vector ISA, and a macro when CUDA kernels are in."""
    # -fno-trapping-math lets GCC vectorize loops with selects (Mish's threshold) without changing any value.
    flags = ["/O2"] if os.name == "nt" else ["-O3", "-fno-trapping-math", *host_isa_flags()]
    flags += openmp_flags()
    if with_cuda:
        flags.append("-DCSPMIRROR_WITH_CUDA")
    return flags


def ld_flags() -> list[str]:
    """Linker flags: the OpenMP runtime torch itself uses (libgomp on Linux)."""
    return [] if os.name == "nt" or platform.system() == "Darwin" else ["-fopenmp"]


def nvcc_flags() -> list[str]:
    """nvcc flags (no fast math: the kernels must stay within SPEC §4 of the float64 reference)."""
    return ["-O3", "-DCSPMIRROR_WITH_CUDA"]


def sources(with_cuda: bool) -> list[str]:
    """Absolute paths of the translation units: one for the schemas, one per device type."""
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [str(CSRC / name) for name in names]
