"""The console script's foundation subcommand and the import contract."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from cspmirror import backends
from cspmirror.cli import main


def test_info_lists_models_and_backends(capsys):
    assert main(["info", "--resolution", "64", "--models", "cspmirrornet_tiny"]) == 0
    out = capsys.readouterr().out
    assert "cspmirrornet_tiny" in out and "GMACs at 64x64" in out
    assert "reference: available" in out and "triton:" in out and "extension:" in out


def test_import_needs_no_triton():
    """``import cspmirror`` (and building a model) works when triton cannot be imported."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import cspmirror, torch\n"
        "m = cspmirror.cspmirrornet_tiny(num_classes=2).eval()\n"
        "assert m(torch.randn(1, 3, 16, 16)).shape == (1, 2)\n"
        "from cspmirror.backends import triton_status\n"
        "s = triton_status('cpu'); assert not s.available and 'cannot be imported' in s.reason, s\n"
        "assert 'triton' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": "", "TRITON_INTERPRET": "1"})


def test_a_checkout_runs_its_own_kernels(tmp_path):
    """A second checkout on PYTHONPATH imports its own ``kernels/`` as ``cspmirror.kernels``, never those of
    the checkout an editable install points at (the Python of one with the kernels of another)."""
    repo = Path(__file__).resolve().parents[1]
    for folder in ("cspmirror", "kernels"):
        shutil.copytree(repo / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import cspmirror.kernels.mirror as m; print(m.__file__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                          env={"PATH": "", "PYTHONPATH": str(tmp_path)})
    assert Path(done.stdout.strip()) == tmp_path / "kernels" / "mirror.py"


def _skip_unless_wheels_build_offline() -> None:
    """Building a wheel without build isolation (no download) needs setuptools >= 70.1 or the wheel package."""
    pytest.importorskip("setuptools")
    try:
        import setuptools.command.bdist_wheel  # noqa: F401
    except ImportError:
        pytest.importorskip("wheel", reason="building a wheel offline needs setuptools >= 70.1 or wheel")


def test_a_wheel_carries_the_kernels_and_the_extension_sources(tmp_path):
    """A wheel (a non-editable install) holds ``kernels/`` as ``cspmirror/kernels`` and ``csrc/`` as
    ``cspmirror/csrc``, where the extension's just-in-time build looks for its sources."""
    _skip_unless_wheels_build_offline()
    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy, so that the build's folders stay out of the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.so")
    for folder in ("cspmirror", "kernels", "csrc"):
        shutil.copytree(repo / folder, source / folder, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("cspmirror-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [f"cspmirror/kernels/{p.name}" for p in (repo / "kernels").glob("*.py")]
    sources = [p for p in (repo / "csrc").iterdir() if p.suffix in (".py", ".cpp", ".cu", ".h")]
    expected += [f"cspmirror/csrc/{p.name}" for p in sources]
    expected += ["cspmirror/yolo/cspmirror_yolov8n.yaml"]
    assert not [name for name in expected if name not in names]


@pytest.mark.parametrize(("triton_version", "numpy_version", "refused"), [
    ("3.6.0", "2.4.6", True), ("3.5.1", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False),
    ("3.8.0+git1a2b3c", "2.5.0rc1", False), ("2.3.1", "1.26.4", False), ("3.6.0", "unknown", False),
])
def test_interpreter_incompatibility(triton_version, numpy_version, refused):
    reason = backends.interpreter_incompatibility(triton_version, numpy_version)
    assert (reason is not None) == refused
    if refused:
        assert f"Triton {triton_version}" in reason and "'numpy<2.4'" in reason and "'triton>=3.7'" in reason


def test_an_interpreter_that_cannot_run_makes_triton_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_triton_import_error", lambda: None)
    monkeypatch.setattr(backends, "_interpreter_error", lambda: "the interpreter cannot run here")
    status = backends.triton_status("cpu")
    assert not status.available and status.reason == "the interpreter cannot run here"
    with pytest.raises(backends.BackendUnavailableError, match="backend='triton' cannot run here: the interpreter"):
        backends.resolve("triton", torch.device("cpu"))
    assert backends.resolve("auto", torch.device("cpu")) == "reference"


def test_help_description_is_a_whole_sentence(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert description.startswith("Tools for the CSPMirrorNet model family") and description.rstrip().endswith(".")


@pytest.mark.parametrize(("args", "message"), [
    (["--models", "resnet50"], "invalid choice: 'resnet50'"),
    (["--resolution", "0"], "expected an integer >= 1, got '0'"),
    (["--num-classes", "-3"], "expected an integer >= 0, got '-3'"),  # was a traceback from the model
])
def test_info_bad_arguments_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_progress_bars_only_on_a_terminal(monkeypatch):
    """One rule for every bar (training, evaluation, benchmarks): drawn on a terminal only, unless turned off. The
    benchmarks' bars were drawn into CI logs and pipes (every 10 s, or at every case)."""
    import io

    from cspmirror.progress import progress_bar, show_progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not show_progress() and progress_bar([1], "x").disable
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert show_progress() and not progress_bar([1], "x").disable and not show_progress(False)
    assert progress_bar([1], "x", enabled=False).disable  # --no-progress on a terminal
    repo = Path(__file__).resolve().parents[1]
    sources = [*(repo / "cspmirror").rglob("*.py"), *(repo / "bench").rglob("*.py")]
    direct = [p.relative_to(repo).as_posix() for p in sources
              if p.name != "progress.py" and "tqdm" in p.read_text()]
    assert direct == [], "use cspmirror.progress.progress_bar"
