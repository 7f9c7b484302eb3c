"""Ultralytics YOLOv8 integration (cspmirror.integrations.ultralytics), fully offline.

Ultralytics reads its settings and decides whether it is online when it is imported, so this module points it
at a private settings folder and marks it offline first. The training run uses a yaml model with no weights,
a synthetic dataset written here, ``amp=False`` (its AMP check downloads yolov8n.pt) and ``plots=False``.
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="cspmirror-yolo-settings-"))

ultralytics = pytest.importorskip("ultralytics")
cy = pytest.importorskip("cspmirror.integrations.ultralytics")

import cspmirror  # noqa: E402
from cspmirror.accelerate import backend_of  # noqa: E402

BACKBONE_SLOTS = (2, 4, 6, 8)  # the C2f layers of yolov8's backbone


@pytest.fixture(scope="module")
def yolo_pair():
    """cspmirror_yolov8n and Ultralytics' own yolov8n, both from yaml (no weights anywhere)."""
    torch.manual_seed(0)
    return cy.yolo(verbose=False), ultralytics.YOLO("yolov8n.yaml", verbose=False)


def _channels(layer: torch.nn.Module) -> tuple[int, int]:
    if isinstance(layer, cy.CSPMirrorC2f):
        return layer.c1, layer.c2
    return layer.cv1.conv.in_channels, layer.cv2.conv.out_channels


def test_block_keeps_c2f_shapes_and_has_no_downsample():
    x = torch.randn(2, 32, 12, 10)
    block = cy.CSPMirrorC2f(32, 32, n=2, shortcut=True).eval()
    assert isinstance(block.down, torch.nn.Identity)
    assert len(block.branches[0].blocks) == 2
    with torch.no_grad():
        assert block(x).shape == (2, 32, 12, 10)
        assert cy.CSPMirrorC2f(48, 64).eval()(torch.randn(2, 48, 7, 9)).shape == (2, 64, 7, 9)


@pytest.mark.parametrize(("args", "match"), [((32, 30), "c2"), ((32, 32, 0), "n"), ((0, 32), "c1")])
def test_block_rejects_bad_arguments_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        cy.CSPMirrorC2f(*args)


def test_register_is_idempotent():
    from ultralytics.nn import tasks
    from ultralytics.nn.modules import C2f

    cy.register()
    wrapped = tasks.parse_model
    cy.register()
    assert tasks.parse_model is wrapped and tasks.CSPMirrorC2f is cy.CSPMirrorC2f
    cy.yolo(verbose=False)
    assert tasks.C2f is C2f  # C2f's stand-in lives only while a cspmirror yaml is parsed


def test_yaml_replaces_the_four_backbone_c2f_with_the_same_channels(yolo_pair):
    ours, theirs = yolo_pair
    assert ours.task == "detect"
    for i, (a, b) in enumerate(zip(ours.model.model, theirs.model.model, strict=True)):
        if i in BACKBONE_SLOTS:
            assert isinstance(a, cy.CSPMirrorC2f) and type(b).__name__ == "C2f", i
            assert _channels(a) == _channels(b), f"layer {i}"
            assert a.n == len(b.m), f"layer {i}: depth-scaled repeats"
            assert a.type == "cspmirror.integrations.ultralytics.CSPMirrorC2f"
        else:
            assert type(a) is type(b), f"layer {i}: {type(a).__name__} != {type(b).__name__}"
    head_c2f = [m for m in ours.model.model if type(m).__name__ == "C2f"]
    assert len(head_c2f) == 4 and all(m.type.endswith(".C2f") for m in head_c2f)


def test_forward_640(yolo_pair):
    ours, _ = yolo_pair
    model = ours.model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 640, 640))
    preds = out[0] if isinstance(out, (tuple, list)) else out
    assert preds.shape == (1, 4 + 80, 80 * 80 + 40 * 40 + 20 * 20)
    assert torch.isfinite(preds).all()


def test_accelerate_and_fuse_apply_to_the_yolo_model(yolo_pair):
    model = cspmirror.accelerate(copy.deepcopy(yolo_pair[0].model), "reference")
    assert backend_of(model) == "reference"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval()(x)[0]
        fused = cspmirror.fuse_for_inference(model)(x)[0]
    assert torch.allclose(fused, expected, rtol=1e-4, atol=1e-4)



def test_gflops_count_the_folded_convolutions(yolo_pair):
    """model.info()'s GFLOPs (THOP's per-module hooks) after fuse_for_inference: a fused block calls its conv as a
    function, which THOP's conv hook never sees (they dropped from 7.7 to 6.8). Folding BatchNorm only removes
    its own few operations; and a fused ConvBNMish counts exactly what a plain conv of its shape does."""
    thop = pytest.importorskip("thop")
    from ultralytics.utils.torch_utils import get_flops

    model = copy.deepcopy(yolo_pair[0].model).eval()
    unfused = get_flops(model, 64)
    fused = get_flops(cspmirror.fuse_for_inference(model), 64)
    assert unfused > 0 and 0.98 * unfused < fused < unfused

    block = cspmirror.layers.ConvBNMish(8, 16, kernel_size=3, stride=2).eval().fuse()
    x = torch.randn(1, 8, 9, 7)
    macs = thop.profile(block, inputs=(x,), verbose=False)[0]
    assert macs == thop.profile(copy.deepcopy(block.conv), inputs=(x,), verbose=False)[0] > 0


def _write_dataset(root) -> str:
    """A tiny YOLO-format dataset of synthetic shapes (filled squares on noise); returns data.yaml's path."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for k in range(count):
            image = rng.integers(0, 60, size=(64, 64, 3), dtype=np.uint8)
            lines = []
            for cls in range(2):
                w, h = rng.integers(12, 24, size=2)
                x0, y0 = rng.integers(0, 64 - w), rng.integers(0, 64 - h)
                image[y0:y0 + h, x0:x0 + w] = (230, 40, 40) if cls == 0 else (40, 40, 230)
                lines.append(f"{cls} {(x0 + w / 2) / 64:.6f} {(y0 + h / 2) / 64:.6f} {w / 64:.6f} {h / 64:.6f}")
            Image.fromarray(image).save(root / "images" / split / f"{k}.png")
            (root / "labels" / split / f"{k}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: blue\n")
    return str(data)


def test_short_training_run_offline(tmp_path, monkeypatch):
    import ultralytics.data.utils as data_utils

    monkeypatch.setattr(data_utils, "check_font", lambda *args, **kwargs: None)  # would fetch Arial.ttf
    data = _write_dataset(tmp_path / "shapes")
    model = cy.yolo(verbose=False)
    model.train(data=data, epochs=1, imgsz=64, batch=4, workers=0, device="cpu", amp=False, plots=False,
                val=False, cache=False, deterministic=False, seed=0, project=str(tmp_path / "runs"),
                name="train", exist_ok=True, verbose=False, warmup_epochs=0)
    trainer = model.trainer
    losses = trainer.tloss.values() if isinstance(trainer.tloss, dict) else [trainer.tloss]
    assert trainer.epoch == 0 and all(torch.isfinite(torch.as_tensor(v)).all() for v in losses)
    assert trainer.last.is_file()
    # The optimizer stepped every block parameter (gradients flowed through the mirrored split and fusion).
    trained = [m for m in trainer.model.modules() if isinstance(m, cy.CSPMirrorC2f)]
    assert len(trained) == 4
    assert all(trainer.optimizer.state[p] for m in trained for p in m.parameters())
    # The model is reloaded from the checkpoint written by the run: the block pickles and loads back.
    blocks = [m for m in model.model.modules() if isinstance(m, cy.CSPMirrorC2f)]
    assert len(blocks) == 4
    with torch.no_grad():
        out = model.model.float().eval()(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(out[0] if isinstance(out, (tuple, list)) else out).all()


def test_ultralytics_onnx_export_follows_the_input(yolo_pair, tmp_path, monkeypatch):
    """Ultralytics' own ``export(format="onnx")`` (TorchScript-based exporter, under inference_mode) gives a graph
    that reads its image input and matches PyTorch on onnxruntime."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "m.pt"
    yolo_pair[0].save(str(path))
    model = ultralytics.YOLO(str(path))
    onnx_path = model.export(format="onnx", imgsz=(64, 96), simplify=False, verbose=False)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    assert len(session.get_inputs()) == 1
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected = copy.deepcopy(yolo_pair[0].model).float().eval()(x)[0].numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


def test_check_onnx_flattens_a_yolo_models_outputs(yolo_pair, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from cspmirror.integrations import export

    x = torch.rand(1, 3, 64, 64)
    path = export.export_onnx(yolo_pair[0].model, x, tmp_path / "yolo.onnx")
    assert export.check_onnx(path, yolo_pair[0].model, torch.rand(2, 3, 64, 64)) <= 1e-4
