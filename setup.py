"""Build script for cspmirror.

The Triton kernels live in the top-level ``kernels/`` folder and install as ``cspmirror.kernels``.
The C++/CUDA extension in ``csrc/`` is optional: it is built when ``CSPMIRROR_BUILD_EXT=1`` is set,
and is otherwise compiled just in time on first use (see ``cspmirror/ops/extension.py``).
"""

from setuptools import find_packages, setup

packages = find_packages(include=["cspmirror", "cspmirror.*"]) + ["cspmirror.kernels"]

setup(
    packages=packages,
    package_dir={"cspmirror.kernels": "kernels"},
    package_data={"cspmirror": ["csrc/*", "yolo/*.yaml"]},
)
