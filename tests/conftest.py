"""Test setup: Triton runs in its CPU interpreter when there is no GPU (set before any kernel import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests are skipped without CUDA; tests of the ``device`` fixture are marked ``on_device``, so that
    a GPU run can select the interpreter-sized grid too (``-m on_device``), not only the ``gpu`` tests."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.on_device)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """The device fast paths run on here: CUDA when present, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


FAILURE_LOG_ENV = "CSPMIRROR_FAILURE_LOG"


def pytest_runtest_logreport(report):
    """With ``CSPMIRROR_FAILURE_LOG=path``, each failure's report is appended to ``path`` as it happens (the
    GPU suite sets it): a run stopped by a time limit keeps the reasons pytest would only print at its end."""
    path = os.environ.get(FAILURE_LOG_ENV)
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as log:
            log.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
