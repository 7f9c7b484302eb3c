"""CSPMirrorNet in Ultralytics YOLOv8 (the paper's detection use; needs the ``yolo`` extra).

:class:`CSPMirrorC2f` fills a ``C2f`` slot of a YOLOv8 yaml: the same arguments (``c1, c2, n, shortcut``) and the
same input and output channels, built from a CSPMirror stage's body (mirrored split -> shared-weight CSP branch
of ``n`` mished dense blocks -> sum+concat fusion -> transition), without the stage's stride-2 downsample:
YOLOv8 puts its own strided ``Conv`` before every C2f. ``cspmirror/yolo/cspmirror_yolov8n.yaml`` (:data:`YAML`)
is yolov8n with its four backbone C2f replaced.

>>> import cspmirror.integrations.ultralytics as cy     # registers the block with Ultralytics
>>> model = cy.yolo()                                    # ultralytics.YOLO(cspmirror_yolov8n.yaml), detect task
>>> model.train(data="my_data.yaml", epochs=100, imgsz=640)

How the name is resolved, without editing Ultralytics: its ``parse_model`` looks module names up in the globals
of ``ultralytics.nn.tasks`` and keeps the set of modules that take ``(c1, c2, n)`` (C2f's treatment: input
channels, width-scaled output channels, depth-scaled repeats) in local frozensets, which cannot be extended from
outside. :func:`register` therefore puts the block into those globals and wraps ``parse_model``: a yaml that
names a cspmirror block is parsed with each of its rows read as a C2f row, and C2f's constructor stands in, for
the duration of that call, for a dispatcher that builds, in row order, the cspmirror block for those rows and
the real C2f for the others. Every argument is resolved by Ultralytics' own code, so a block row scales
exactly as a C2f row would.

Backends: the block's ops follow :func:`cspmirror.accelerate` like any cspmirror module ("auto" runs Triton on
CUDA tensors). For inference, ``cspmirror.fuse_for_inference(model.model)`` folds the block's BatchNorms
(Ultralytics' own ``fuse()`` folds only its ``Conv`` layers); ``model.info()`` still counts the folded
convolutions' GFLOPs then (:func:`register` gives THOP, Ultralytics' FLOP counter, a rule for them). Checkpoints
pickle the block by its import path, so loading one needs cspmirror installed (and not Ultralytics' restricted
``ULTRALYTICS_SAFE_LOAD`` mode).

Export: ``model.export(format="onnx")`` works (the graph matches PyTorch on onnxruntime), for the image size
exported: the split widths of every block are fixed at that size, so ``dynamic=True`` leaves the batch free but
not the height and width (another size gives wrong boxes, with no error): export at the size you run.

Limits: the registration lives in the process that imported this module. Ultralytics' multi-GPU (DDP) training
re-parses the yaml in worker processes it starts itself, which do not import cspmirror: train on one device, or
launch DDP yourself with this module imported in every rank. Parsing swaps ``tasks.C2f`` for the duration of one
``parse_model`` call, so do not build two YOLO models from different threads at once.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from ..layers import ConvBNMish, CSPMirrorStage

#: The packaged yaml: yolov8 (scale n by its file name) with CSPMirrorC2f in the backbone.
YAML = Path(__file__).resolve().parent.parent / "yolo" / "cspmirror_yolov8n.yaml"


class CSPMirrorC2f(CSPMirrorStage):
    """A CSPMirror stage's body in a YOLOv8 C2f slot: [N, c1, H, W] -> [N, c2, H, W].

    Args:
        c1: input channels (Ultralytics fills this in from the previous layer).
        c2: output channels, a multiple of 4 (the dense blocks work on ``c2 / 2`` channels, which must be even).
        n: number of mished dense blocks (C2f's number of bottlenecks; Ultralytics scales it by depth).
        shortcut: accepted for C2f compatibility; a mished dense block always adds its input (SPEC §1.3).
        overlap, mirror, siamese, reduce, fusion: the stage's knobs (SPEC §1.4, §2).

    When ``c1 != c2`` (a slot after a Concat) a 1x1 CBM maps c1 to c2 first; with ``c1 == c2`` (every backbone
    slot) the body starts at the mirrored split.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, overlap: float = 0.25,
                 mirror: bool = True, siamese: bool = True, reduce: str = "sum", fusion: str = "sum_concat"):
        for name, value in (("c1", c1), ("c2", c2), ("n", n)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if c2 % 4:
            raise ValueError(f"c2 must be a multiple of 4 (the dense blocks need an even c2 / 2), got {c2}")
        super().__init__(c2, c2, n, expand_ratio=1.0, block_ratio=0.5, split=True, overlap=overlap,
                         mirror=mirror, siamese=siamese, reduce=reduce, fusion=fusion)
        # The stage's stride-2 downsample is YOLOv8's Conv before the slot: drop it, keep a channel map if needed.
        self.down = nn.Identity() if c1 == c2 else ConvBNMish(c1, c2, 1)
        self.c1, self.c2, self.n, self.shortcut = c1, c2, n, bool(shortcut)

    def extra_repr(self) -> str:
        return f"c1={self.c1}, c2={self.c2}, n={self.n}"


#: Blocks that :func:`register` makes resolvable in Ultralytics yaml files, by name.
BLOCKS: dict[str, type[nn.Module]] = {"CSPMirrorC2f": CSPMirrorC2f}


def _type_name(cls: type) -> str:
    """Ultralytics' ``layer.type`` spelling of a class (``str(cls)[8:-2]``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _dispatcher(builders: Iterator[Callable[..., nn.Module]]) -> type[nn.Module]:
    """A stand-in for ``C2f`` whose n-th construction builds with the n-th of ``builders``."""

    class C2fSlot(nn.Module):
        def __new__(cls, *args, **kwargs):  # returns another class's instance: __init__ is not called again
            return next(builders)(*args, **kwargs)

    C2fSlot.__qualname__ = "C2fSlot"  # as Ultralytics prints it while parsing: cspmirror...ultralytics.C2fSlot
    return C2fSlot


def _wrap_parse_model(original: Callable, tasks) -> Callable:
    @functools.wraps(original)
    def parse_model(d: dict, ch, verbose: bool = True):
        rows = [*d.get("backbone", []), *d.get("head", [])]
        if not any(row[2] in BLOCKS for row in rows):
            return original(d, ch, verbose)
        d = copy.deepcopy(d)
        c2f, builders = tasks.C2f, []
        for row in (*d.get("backbone", []), *d.get("head", [])):
            if row[2] in BLOCKS:
                builders.append(BLOCKS[row[2]])
                row[2] = "C2f"  # parsed as a C2f row: Ultralytics resolves c1, c2 (width) and n (depth)
            elif row[2] == "C2f":
                builders.append(c2f)
        tasks.C2f = _dispatcher(iter(builders))
        try:
            model, save = original(d, ch, verbose)
        finally:
            tasks.C2f = c2f
        for layer in model:
            if type(layer) in (c2f, *BLOCKS.values()):
                layer.type = _type_name(type(layer))
        return model, save

    parse_model.cspmirror_wrapped = True
    return parse_model


def _count_conv_macs(module: ConvBNMish, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    """THOP's counting rule for :class:`ConvBNMish`. Once fused, the module calls its conv as a function, so the
    conv's own counting hook never runs: its multiply-adds are counted here instead, as THOP counts a conv's
    (one per output element and weight of a filter). Unfused, the conv counts itself."""
    if module.fused:
        module.total_ops += output.numel() * module.conv.weight[0].numel()


def _register_flop_rule() -> None:
    """Give THOP (``thop``, which Ultralytics' ``model.info()`` counts GFLOPs with) its rule for fused convs."""
    if importlib.util.find_spec("thop") is None:
        return
    rules = getattr(importlib.import_module("thop.profile"), "register_hooks", None)
    if isinstance(rules, dict):
        rules.setdefault(ConvBNMish, _count_conv_macs)


def register() -> None:
    """Make Ultralytics resolve :data:`BLOCKS` by name in model yaml files (idempotent), and count the GFLOPs of
    models fused by :func:`cspmirror.fuse_for_inference`.

    Raises:
        ImportError: Ultralytics is not installed (``pip install 'cspmirror[yolo]'``).
    """
    if importlib.util.find_spec("ultralytics") is None:
        raise ImportError("cspmirror's YOLO integration needs ultralytics: pip install 'cspmirror[yolo]'")
    from ultralytics.nn import tasks

    for name, cls in BLOCKS.items():
        setattr(tasks, name, cls)
    if not getattr(tasks.parse_model, "cspmirror_wrapped", False):
        tasks.parse_model = _wrap_parse_model(tasks.parse_model, tasks)
    _register_flop_rule()


def yolo(cfg: str | Path = YAML, **kwargs):
    """``ultralytics.YOLO`` built from ``cfg`` (default :data:`YAML`: cspmirror_yolov8n, untrained).

    ``kwargs`` go to ``ultralytics.YOLO`` (e.g. ``task="detect"``, ``verbose=False``).
    """
    register()
    from ultralytics import YOLO

    cfg = Path(cfg)
    if not cfg.is_file():
        raise FileNotFoundError(f"cfg {str(cfg)!r} is not a file (cspmirror never downloads models)")
    return YOLO(str(cfg), **kwargs)


__all__ = ["CSPMirrorC2f", "BLOCKS", "YAML", "register", "yolo"]

if importlib.util.find_spec("ultralytics") is not None:
    register()
