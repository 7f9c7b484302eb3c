"""TorchScript of the reference backend, by tracing (``torch.jit.script`` is not supported: see README)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import cspmirror


@pytest.mark.parametrize("fused", [False, True], ids=["bn", "fused"])
def test_trace_save_load_matches_eager(fused):
    model = cspmirror.set_backend(cspmirror.cspmirrornet_tiny(num_classes=5).eval(), "reference")
    if fused:
        cspmirror.fuse_for_inference(model)
    x = torch.randn(2, 3, 32, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # check_trace re-traces and compares graphs; it reports only renamed (mangled) submodule types here.
        traced = torch.jit.trace(model, x, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(traced(x), expected)
        assert torch.equal(loaded(x), expected)
        other = torch.randn(2, 3, 32, 24)  # same shape, new values: the graph computes, not replays
        assert torch.equal(loaded(other), model(other))
