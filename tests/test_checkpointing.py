"""Gradient checkpointing (``model.set_grad_checkpointing()``, ``torch.utils.checkpoint``): the same step as
without, bit for bit (loss, every gradient, running statistics and ``num_batches_tracked``, which the
recomputation must not count again), with fewer tensors kept; on the reference backend and, for one stage, the
Triton backend (whose dense blocks otherwise recompute their conv inputs from what ``bn_mish`` saved)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import triton_or_skip
from torch.utils.checkpoint import checkpoint

import cspmirror
from cspmirror.layers import CSPMirrorStage


def _step(module: torch.nn.Module, x: torch.Tensor, forward) -> tuple[torch.Tensor, dict, dict, int]:
    """One training forward + backward of a copy of ``module`` by ``forward(module, x)``: the loss, the
    gradients, the buffers, and how many tensors autograd kept outside any checkpointed region."""
    module = copy.deepcopy(module).train()
    torch.manual_seed(0)  # the same stochastic-depth masks in every step compared
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        loss = forward(module, x).square().mean()
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {name: b.clone() for name, b in module.named_buffers()}, len(kept)


def _assert_same_step(plain: tuple, checkpointed: tuple) -> None:
    (loss, grads, buffers, kept), (loss_c, grads_c, buffers_c, kept_c) = plain, checkpointed
    assert torch.equal(loss, loss_c) and grads.keys() == grads_c.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, grads_c[name]), name
    for name, buffer in buffers.items():
        assert torch.equal(buffer, buffers_c[name]), name
    assert kept_c < kept, (kept_c, kept)


def test_model_grad_checkpointing_is_the_same_step():
    """Also with stochastic depth: checkpoint replays the RNG, so the recomputation draws the same masks."""
    model = cspmirror.cspmirrornet_tiny(num_classes=5, drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    plain = _step(model, x, lambda m, x: m(x))

    def checkpointed(m, x):
        m.set_grad_checkpointing()
        return m(x)

    result = _step(model, x, checkpointed)
    _assert_same_step(plain, result)
    assert int(result[2]["stem.bn.num_batches_tracked"]) == 1


def test_features_only_checkpointing_and_no_grad():
    model = cspmirror.cspmirrornet_tiny(features_only=True, out_indices=(2, 3))
    x = torch.randn(2, 3, 32, 32)

    def levels(m, x):
        return torch.cat([f.flatten() for f in m(x)])

    def checkpointed(m, x):
        m.set_grad_checkpointing()
        return levels(m, x)

    _assert_same_step(_step(model, x, levels), _step(model, x, checkpointed))
    model.eval()
    with torch.no_grad():  # nothing to checkpoint without autograd: the plain forward
        plain = model(x)
        model.set_grad_checkpointing()
        assert all(torch.equal(a, b) for a, b in zip(plain, model(x), strict=True))


def test_triton_stage_under_checkpoint_is_the_same_step():
    """A split stage on the Triton backend (interpreter here) inside ``torch.utils.checkpoint``: its dense
    blocks' conv2 then keeps its input like a plain conv (the recompute-from-bn_mish path unpacks what
    bn_mish saved a second time, which checkpoint forbids), and the step is still bit for bit the same."""
    triton_or_skip()
    stage = CSPMirrorStage(4, 8, depth=1, expand_ratio=1.0, block_ratio=0.5, split=True)
    cspmirror.set_backend(stage, "triton")
    x = torch.randn(2, 4, 8, 8)
    plain = _step(stage, x, lambda m, x: m(x))
    _assert_same_step(plain, _step(stage, x, lambda m, x: checkpoint(m, x, use_reentrant=False)))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_running_statistics_are_counted_once(use_reentrant):
    """nn.BatchNorm2d under checkpoint updates its running statistics again in the recomputation;
    BatchNormMish2d does not (both checkpoint implementations)."""
    bn = cspmirror.BatchNormMish2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    checkpoint(bn, x, use_reentrant=use_reentrant).sum().backward()
    reference = torch.nn.BatchNorm2d(3)
    reference(x)
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, reference.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, reference.running_var, rtol=0, atol=0)


def test_compiled_fullgraph_checkpointed_step_on_a_fresh_model(monkeypatch):
    """``torch.compile(fullgraph=True)`` of a model built in a process that has not run an op yet: the model
    loads its ops' implementations when built (Dynamo traces no import, and inside a checkpointed stage it
    cannot even fill the look-up cache). Forward and backward with checkpointing, as the eager step."""
    from cspmirror import ops

    monkeypatch.setattr(ops, "_RESOLVED", {})
    model = cspmirror.cspmirrornet_tiny(num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()

    def compiled(m, x):
        m.set_grad_checkpointing()
        return torch.compile(m, fullgraph=True, backend="aot_eager")(x)

    loss, grads, buffers, _ = _step(model, x, compiled)  # first: no op has run eagerly yet
    eager = _step(model, x, lambda m, x: m(x))
    torch.testing.assert_close(loss, eager[0], rtol=1e-6, atol=0)
    for name, grad in eager[1].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, buffer in eager[2].items():
        torch.testing.assert_close(buffers[name], buffer, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("kind", ["model", "stage", "layers"])
def test_moving_a_model_loads_its_ops_for_the_new_device(monkeypatch, kind):
    """A model, a bare stage (the Ultralytics block is one) or any module holding a cspmirror layer loads
    the fused ops' implementations for the device it is moved to (``.to()`` of any kind: here a dtype, the
    device staying the CPU)."""
    from cspmirror import ops

    module = {"model": cspmirror.cspmirrornet_tiny, "stage": lambda: CSPMirrorStage(4, 8, depth=1),
              "layers": lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), cspmirror.BatchNormMish2d(4))}[kind]()
    monkeypatch.setattr(ops, "_RESOLVED", {})
    module.to(torch.float64)
    assert {key[0] for key in ops._RESOLVED if key[1:] == ("auto", "cpu", None)} == {
        "mirror_split", "mirror_fuse", "bn_mish", "conv_bn_mish"}


@pytest.mark.parametrize("how", ["torch.load", "set_backend"])
def test_a_loaded_or_switched_model_loads_its_ops(monkeypatch, how):
    """A whole model unpickled (``torch.load`` in a new process, whose look-up cache is empty) or pointed at a
    backend by ``set_backend`` loads its ops' implementations then, as a moved one does: a Triton or extension
    model compiled with ``fullgraph=True`` afterwards failed at the import (or the extension's load) in its
    first op."""
    from cspmirror import ops

    model = cspmirror.set_backend(cspmirror.cspmirrornet_tiny(), "reference")
    saved = io.BytesIO()
    torch.save(model, saved)
    monkeypatch.setattr(ops, "_RESOLVED", {})
    if how == "torch.load":
        saved.seek(0)
        model = torch.load(saved, weights_only=False)
    else:
        cspmirror.set_backend(model, "reference")
    assert {key[0] for key in ops._RESOLVED if key[1:] == ("reference", "cpu", None)} == {
        "mirror_split", "mirror_fuse", "bn_mish", "conv_bn_mish"}
