"""The console script's foundation subcommand and the import contract."""

from __future__ import annotations

import subprocess
import sys

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
