"""Deployment (cspmirror.integrations.export): torch.export and ONNX of the fused model, onnxruntime check."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_bn, rel_err

import cspmirror
from cspmirror.accelerate import backend_of, ops_used
from cspmirror.backends import BackendUnavailableError
from cspmirror.integrations import export


def _features_model() -> cspmirror.CSPMirrorNet:
    return cspmirror.cspmirrornet_tiny(features_only=True, out_indices=(2, 3, 4)).eval()



def test_prepare_for_export_fuses_a_copy_on_the_reference_backend():
    model = cspmirror.cspmirrornet_tiny(num_classes=10).train()
    prepared = export.prepare_for_export(model)
    assert prepared is not model and not prepared.training
    assert backend_of(prepared) == "reference" and "conv_bn_mish" in ops_used(prepared)
    assert model.training and backend_of(model) == "auto" and "bn_mish" in ops_used(model)


@pytest.mark.parametrize("prepare", [True, False])
def test_export_of_a_compiled_model_exports_the_model(prepare):
    """A ``torch.compile`` wrapper exports as the model it wraps (the dynamic batch failed on the wrapper's
    ``forward(*args, **kwargs)``: 'mismatch between the structure of inputs and dynamic_shapes')."""
    model = cspmirror.set_backend(cspmirror.cspmirrornet_tiny(num_classes=10).eval(), "reference")
    program = export.export_program(torch.compile(model), torch.randn(1, 3, 32, 32), prepare=prepare)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = (export.prepare_for_export(model) if prepare else model)(x)
        assert torch.equal(program.module()(x), expected)


@pytest.mark.parametrize("bad", [torch.randn(3, 32, 32), "x"])
def test_export_rejects_a_bad_example_input(bad):
    with pytest.raises(ValueError, match="example_input"):
        export.export_program(cspmirror.cspmirrornet_tiny(), bad)


@pytest.fixture(scope="module")
def exported():
    """A features_only model (BN statistics randomised) and its torch.export program (dynamic batch), from an
    example of batch 1 (which torch.export alone would specialize to the constant 1)."""
    torch.manual_seed(0)
    model = randomize_bn(_features_model(), affine=False)
    return model, export.export_program(model, torch.randn(1, 3, 32, 32))


def test_torch_export_with_dynamic_batch(exported):
    model, program = exported
    assert isinstance(program, torch.export.ExportedProgram)
    reference = export.prepare_for_export(model)
    for batch in (1, 2, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            outs, expected = program.module()(x), reference(x)
        assert [tuple(o.shape) for o in outs] == [(batch, 64, 8, 8), (batch, 128, 4, 4), (batch, 256, 2, 2)]
        for o, e in zip(outs, expected, strict=True):
            assert rel_err(o, e) <= 1e-6
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("cspmirror" in t for t in targets), "the reference graph must hold standard aten ops only"


@pytest.fixture(scope="module")
def onnx_file(exported, tmp_path_factory):
    """The ONNX file of the exported program (written once for the module: the export takes a while)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model, program = exported
    return model, export.export_onnx(program, torch.randn(2, 3, 32, 32), tmp_path_factory.mktemp("onnx") / "m.onnx")


def test_onnx_export_matches_onnxruntime(onnx_file):
    pytest.importorskip("onnxruntime")
    import onnx

    model, path = onnx_file
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["x"] and len(graph.output) == 3
    for batch in (1, 2, 3):
        x = torch.randn(batch, 3, 32, 32)
        assert export.check_onnx(path, model, x) <= 1e-4
        shapes = [tuple(o.shape) for o in export.onnxruntime_outputs(path, x)]
        assert shapes == [(batch, 64, 8, 8), (batch, 128, 4, 4), (batch, 256, 2, 2)]


def test_check_onnx_fails_for_other_weights(onnx_file):
    pytest.importorskip("onnxruntime")
    _, path = onnx_file
    torch.manual_seed(1)  # the fixture's model was drawn with seed 0
    other = randomize_bn(_features_model(), affine=False)
    with pytest.raises(RuntimeError, match="differs"):
        export.check_onnx(path, other, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(("backend", "namespace"), [("triton", "cspmirror"), ("extension", "cspmirror_ext")])
def test_onnx_export_of_fast_backend_ops_names_them_and_the_fix(backend, namespace, tmp_path):
    """export_program(..., prepare=False) keeps a fast backend's ops, which no ONNX exporter knows: the error
    names them and the fix (it was the exporter's 'No ONNX function found', naming neither)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = cspmirror.cspmirrornet_tiny(num_classes=10)
    try:
        cspmirror.fuse_for_inference(model, backend=backend)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    x = torch.randn(1, 3, 32, 32)
    program = export.export_program(model, x, prepare=False)
    with pytest.raises(ValueError, match=rf"calls {namespace}::conv_bn_mish, {namespace}::mirror_split, "
                                         rf"{namespace}::mirror_fuse, which have no ONNX lowering .* prepare=True "
                                         r".* switch the model to the reference backend"):
        export.export_onnx(program, x, tmp_path / "m.onnx")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("backend", ["triton", "extension"])
@pytest.mark.parametrize(("dynamo", "fused"), [(False, False), (True, True)], ids=["torchscript", "dynamo-fused"])
def test_torch_onnx_export_of_a_fast_backend_model(backend, dynamo, fused, tmp_path):
    """torch.onnx.export of a model on a fast backend (Ultralytics' export of a CUDA model, say) records the
    reference ops, the same function in ops ONNX knows (it failed: 'unrecognized namespace cspmirror')."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomize_bn(cspmirror.cspmirrornet_tiny(num_classes=10), affine=False).eval()
    try:
        model = cspmirror.fuse_for_inference(model, backend=backend) if fused else cspmirror.accelerate(model, backend)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    path = tmp_path / "m.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.randn(1, 3, 32, 28),), str(path), dynamo=dynamo, opset_version=18)
        x = torch.randn(1, 3, 32, 28)
        expected = model(x)
    assert backend_of(model) == backend
    assert rel_err(export.onnxruntime_outputs(path, x)[0], expected) <= 1e-5


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_torchscript_onnx_exporter_keeps_the_input(grad_mode, tmp_path):
    """torch.onnx.export(dynamo=False) (what Ultralytics' export runs, under inference_mode) must give a graph
    that reads its input: writes into slices of a buffer (mirror_fuse's zeros, the dense block's output
    buffer) are dropped by its ONNX conversion, which used to leave a graph of constants."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomize_bn(cspmirror.cspmirrornet_tiny(num_classes=10, reduce="mean"), affine=False).eval()
    path = tmp_path / "legacy.onnx"
    with getattr(torch, grad_mode)():
        torch.onnx.export(model, (torch.randn(1, 3, 32, 28),), str(path), dynamo=False, opset_version=18)
    assert len(onnx.load(str(path)).graph.input) == 1
    x = torch.randn(1, 3, 32, 28)
    with torch.no_grad():
        expected = model(x)
    assert rel_err(export.onnxruntime_outputs(path, x)[0], expected) <= 1e-5
