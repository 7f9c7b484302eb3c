"""Deployment: ``torch.export`` and ONNX export of the inference-fused model, checked on onnxruntime.

What is exported is the model as it runs for inference: BatchNorm folded into the convolutions
(:func:`cspmirror.fuse_for_inference`) on the reference backend, so that the graph holds only standard aten ops
(convolution, mish, add, cat, flip, slicing) that every runtime knows. The batch dimension is dynamic; height
and width are fixed by the example input (the split widths of every stage are computed from them).

>>> from cspmirror.integrations import export
>>> x = torch.randn(1, 3, 256, 256)
>>> program = export.export_program(model, x)                         # torch.export.ExportedProgram
>>> path = export.export_onnx(program, x, "cspmirrornet53.onnx")      # needs the ``export`` extra
>>> export.check_onnx(path, model, torch.randn(4, 3, 256, 256))       # max relative error vs PyTorch

A classifier exports one output [N, num_classes]; a ``features_only`` model one output per level.

TorchScript: ``torch.jit.script`` cannot compile the ops' keyword-only signatures (SPEC §3);
``torch.jit.trace(model, x, check_trace=False)`` works on the reference backend for a fixed input size. Both are
deprecated by PyTorch in favour of ``torch.export``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..fuse import fuse_for_inference

# The fast backends' registered ops: torch.ops.cspmirror (Triton) and torch.ops.cspmirror_ext (the extension).
# No ONNX exporter knows them; only the reference backend's graph (standard aten ops) lowers to ONNX.
_FAST_OP_NAMESPACES = ("cspmirror", "cspmirror_ext")


def prepare_for_export(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) in eval mode, BatchNorm folded, on the reference backend; for a
    ``torch.compile`` wrapper, the model it wraps."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _uncompiled(model)
    return fuse_for_inference(model if inplace else copy.deepcopy(model), backend="reference")


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds, else ``model``: export traces the module itself, and the
    wrapper's ``forward(*args, **kwargs)`` cannot take the batch dimension's ``dynamic_shapes`` ('mismatch
    between the structure of inputs and dynamic_shapes')."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _check_input(example_input: object) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else None
        raise ValueError(f"example_input must be a 4-D tensor [N, C, H, W], got {shape or type(example_input)}")
    return example_input


def _dynamic_shapes(dynamic_batch: bool) -> tuple | None:
    return ({0: torch.export.Dim("batch")},) if dynamic_batch else None


def _traced_input(example_input: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    """The input to trace with: a batch of 1 repeated to 2 for a dynamic batch (``torch.export`` specializes a
    dimension of size 1 to the constant 1; the program still runs at batch 1)."""
    if dynamic_batch and example_input.shape[0] == 1:
        return example_input.repeat(2, 1, 1, 1)
    return example_input


def export_program(model: nn.Module, example_input: torch.Tensor, *, dynamic_batch: bool = True,
                   prepare: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` of the inference form of ``model`` for inputs shaped like ``example_input``.

    Args:
        model: a cspmirror model (or any module built from cspmirror modules, or a ``torch.compile`` of one).
        example_input: [N, C, H, W]; H and W are fixed in the program, N is dynamic with ``dynamic_batch``.
        prepare: fuse and switch a copy to the reference backend first (:func:`prepare_for_export`); False
            exports ``model`` as it is (e.g. to keep a Triton backend's custom ops in the graph; those have no
            ONNX lowering, so :func:`export_onnx` refuses such a program).

    Returns:
        The ``torch.export.ExportedProgram``; ``program.module()(x)`` runs it.
    """
    example_input = _check_input(example_input)
    module = prepare_for_export(model) if prepare else _uncompiled(model)
    return torch.export.export(module, (_traced_input(example_input, dynamic_batch),),
                               dynamic_shapes=_dynamic_shapes(dynamic_batch))


def _fast_ops(program: torch.export.ExportedProgram) -> list[str]:
    """The Triton / extension ops that ``program`` calls (``"cspmirror_ext::conv_bn_mish"``, ...), each once, in
    graph order: what ``export_program(model, x, prepare=False)`` keeps of a model on a fast backend."""
    names = (node.target.name() for node in program.graph.nodes
             if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
             and node.target.namespace in _FAST_OP_NAMESPACES)
    return list(dict.fromkeys(names))


def _check_onnx_lowering(program: torch.export.ExportedProgram) -> None:
    """ValueError naming the ops when ``program`` calls ops that have no ONNX lowering, before the exporter
    fails on them with an error that names neither the backend nor the fix."""
    unlowered = _fast_ops(program)
    if unlowered:
        raise ValueError(
            f"model: the exported program calls {', '.join(unlowered)}, which have no ONNX lowering (the Triton or "
            "extension backend's ops, kept by export_program(..., prepare=False)); export it with prepare=True "
            "(the default), or switch the model to the reference backend first "
            "(cspmirror.accelerate(model, 'reference'))")


def export_onnx(model: nn.Module | torch.export.ExportedProgram, example_input: torch.Tensor,
                path: str | os.PathLike, *, dynamic_batch: bool = True, opset_version: int | None = None) -> Path:
    """Write ``model``'s inference form to the ONNX file ``path`` with the dynamo exporter.

    Args:
        model: a model (exported through :func:`export_program`) or an ``ExportedProgram`` from it.
        example_input: [N, C, H, W], as for :func:`export_program`.
        opset_version: the ONNX opset (default: the exporter's); Mish needs opset 18 or later.

    Returns:
        ``path``. The graph's input is named ``x``; its outputs are the model's outputs in order.

    Raises:
        ValueError: ``model`` is a program that calls Triton or extension ops (from
            ``export_program(..., prepare=False)``): they have no ONNX lowering.
    """
    _require("onnx", "onnxscript")
    example_input = _check_input(example_input)
    program = model if isinstance(model, torch.export.ExportedProgram) else export_program(
        model, example_input, dynamic_batch=dynamic_batch)
    _check_onnx_lowering(program)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {} if opset_version is None else {"opset_version": opset_version}
    torch.onnx.export(program, (_traced_input(example_input, dynamic_batch),), str(path), dynamo=True,
                      verbose=False, **kwargs)
    return path


def onnxruntime_outputs(path: str | os.PathLike, x: torch.Tensor) -> list[torch.Tensor]:
    """Run the ONNX file ``path`` on onnxruntime's CPU provider; the outputs as CPU tensors."""
    _require("onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: _check_input(x).detach().cpu().numpy()}
    return [torch.from_numpy(out) for out in session.run(None, feed)]


def check_onnx(path: str | os.PathLike, model: nn.Module, x: torch.Tensor, *, rtol: float = 1e-4) -> float:
    """Compare the ONNX file ``path`` on onnxruntime with ``model``'s inference form in PyTorch on ``x``.

    Returns:
        The largest ``||onnx - torch|| / ||torch||`` over the outputs.

    Raises:
        RuntimeError: the output counts or shapes differ, or an error exceeds ``rtol``.
    """
    from torch.utils._pytree import tree_leaves

    reference = prepare_for_export(model)
    with torch.no_grad():
        expected = reference(x.to(next(reference.parameters()).device))
    # Flattened as the exporter flattens them (a YOLO model returns a tensor and a list or dict of tensors).
    expected = tree_leaves(expected)
    got = onnxruntime_outputs(path, x)
    if len(got) != len(expected):
        raise RuntimeError(f"the ONNX model has {len(got)} outputs, PyTorch {len(expected)}")
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        e = e.detach().cpu().float()
        if g.shape != e.shape:
            raise RuntimeError(f"output {i}: ONNX shape {tuple(g.shape)} != PyTorch {tuple(e.shape)}")
        err = ((g.float() - e).norm() / e.norm().clamp_min(1e-30)).item()
        if not err <= rtol:  # also catches NaN
            raise RuntimeError(f"output {i}: ONNX differs from PyTorch by {err:.3g} (relative) > rtol={rtol}")
        worst = max(worst, err)
    return worst


def _require(*packages: str) -> None:
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install 'cspmirror[export]'")


__all__ = ["prepare_for_export", "export_program", "export_onnx", "onnxruntime_outputs", "check_onnx"]
