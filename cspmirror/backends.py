"""Which backends can run here, and why not when they cannot.

Nothing in this module imports triton or builds the extension at import time: ``import cspmirror`` must
work on a machine without a GPU and without triton. Each probe runs once, on first use.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "triton", "extension", "reference")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"{self.name}: {state} ({self.reason})"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run here; the message says why."""


def triton_interpreted() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported: {exc}"
    return None


def _major_minor(version: str) -> tuple[int, int]:
    """``"3.6.0+git1a2b"`` -> (3, 6); (0, 0) when ``version`` does not start with major.minor."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def interpreter_incompatibility(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton ``triton_version``'s interpreter cannot run the kernels beside NumPy ``numpy_version``,
    or None when it can.

    Before Triton 3.7 the interpreter turns a loop bound into a Python int with ``int()`` of a 1-element
    array, which NumPy 2.4 refuses: every kernel with a run-time loop bound fails there.
    """
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"TRITON_INTERPRET=1, but Triton {triton_version}'s interpreter cannot run loops with run-time "
                f"bounds under NumPy {numpy_version} (it calls int() on 1-element arrays, which NumPy 2.4 "
                "refuses; fixed in Triton 3.7): install 'numpy<2.4' or 'triton>=3.7'")
    return None


@functools.cache
def _interpreter_error() -> str | None:
    import numpy  # the interpreter's own dependency
    import triton

    return interpreter_incompatibility(triton.__version__, numpy.__version__)


def triton_status(device: torch.device | str | None = None) -> BackendStatus:
    """Whether Triton kernels can run on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    error = _triton_import_error()
    if error:
        return BackendStatus("triton", False, error)
    if triton_interpreted():
        error = _interpreter_error()
        if error:
            return BackendStatus("triton", False, error)
        return BackendStatus("triton", True, "TRITON_INTERPRET=1: kernels run in the CPU interpreter")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return BackendStatus("triton", False, "no CUDA device is available")
        return BackendStatus("triton", True, f"compiled for {torch.cuda.get_device_name(device)}")
    return BackendStatus(
        "triton", False,
        f"Triton kernels need CUDA tensors; for {device.type} tensors set TRITON_INTERPRET=1 before "
        "importing cspmirror to run them in the (slow) interpreter",
    )


def extension_status() -> BackendStatus:
    """Whether the C++/CUDA extension is built or can be built just in time."""
    try:
        from .ops import extension
    except ImportError as exc:
        return BackendStatus("extension", False, f"not part of this install: {exc}")
    return extension.status()


def reference_status() -> BackendStatus:
    return BackendStatus("reference", True, "pure PyTorch, any device")


def all_statuses(device: torch.device | str | None = None) -> list[BackendStatus]:
    return [reference_status(), triton_status(device), extension_status()]


def ensure_loaded(backend: str) -> None:
    """Load (build just in time) the extension when ``backend`` is ``extension``, so that a failed build raises
    :class:`BackendUnavailableError` here, with the compiler's message, instead of at the first op call."""
    if backend == "extension":
        from .ops import extension

        extension.load()


def resolve(backend: str, device: torch.device) -> str:
    """Turn ``backend`` ("auto" included) into the concrete backend that runs tensors on ``device``.

    ``auto`` picks Triton for CUDA tensors when it can run, else the reference. An explicit backend that
    cannot run here raises :class:`BackendUnavailableError` with the reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_status(device).available:
            return "triton"
        return "reference"
    if backend == "triton":
        status = triton_status(device)
        if not status.available:
            raise BackendUnavailableError(f"backend='triton' cannot run here: {status.reason}")
    if backend == "extension":
        status = extension_status()
        if not status.available:
            raise BackendUnavailableError(f"backend='extension' cannot run here: {status.reason}")
    return backend
