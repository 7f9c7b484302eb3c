"""Training checkpoints: everything needed to continue a run exactly, or to rebuild its model.

A checkpoint is a dict saved with ``torch.save`` and loadable with ``torch.load(..., weights_only=True)``:

=================  =================================================================================
key                value
=================  =================================================================================
model              the model's state dict (never the DDP wrapper's: no ``module.`` prefix)
optimizer          ``optimizer.state_dict()``
scheduler          ``scheduler.state_dict()`` (per-step LambdaLR: the step count)
scaler             ``GradScaler.state_dict()`` (empty when AMP does not use fp16)
epoch              number of completed epochs
model_name         registry name, e.g. ``cspmirrornet_tiny``
model_kwargs       the knobs given to ``get_model`` (overlap, mirror, ...)
num_classes,       what the data said; ``mean``/``std`` are the input normalisation (0..1 scale)
classes, mean,
std, image_size
recipe             the :class:`~cspmirror.train.recipes.Recipe` as a dict
args               the :class:`~cspmirror.train.engine.TrainConfig` as a dict
history            the per-epoch metric rows so far
best_val_acc       best validation top-1 so far (%)
=================  =================================================================================

``cspmirror.load_checkpoint(model, path)`` and ``get_model(name, weights=path)`` read the ``model`` entry.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..fuse import set_backend
from ..models import get_model
from .data import DataConfig

LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/last.pt`` when ``path`` is a run folder; FileNotFoundError if absent."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


# What evaluating a checkpoint needs, and what resuming its run needs on top.
EVAL_KEYS = ("model", "model_name", "num_classes", "mean", "std")
RESUME_KEYS = (*EVAL_KEYS, "model_kwargs", "optimizer", "scheduler", "epoch", "recipe")


def load_checkpoint_dict(path: str | os.PathLike, needs: tuple[str, ...] = EVAL_KEYS) -> dict:
    """The checkpoint dict at ``path`` (a file or a run folder), on the CPU; checks it is a training one with
    the keys ``needs``."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch.save file at all (text, CSV, truncated): no pickle traceback
        raise ValueError(f"{str(path)!r} is not a cspmirror training checkpoint (torch.load failed: "
                         f"{type(exc).__name__})") from None
    missing = [k for k in needs if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{str(path)!r} is not a cspmirror training checkpoint (missing {missing})")
    return state


def load_weights(model: nn.Module, state: dict) -> None:
    """Load the checkpoint's weights into ``model``, built from its ``model_name`` and knobs; ValueError when they
    do not fit (a checkpoint edited, or written by a version of cspmirror with other module names)."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"the checkpoint's weights do not fit its model, {state['model_name']} with knobs "
                         f"{state.get('model_kwargs') or {}}: {detail[:300]}") from None


def model_from_checkpoint(state: dict, device: torch.device | str = "cpu", backend: str = "auto") -> nn.Module:
    """Rebuild the checkpoint's model (architecture knobs included), load its weights, eval mode."""
    model = get_model(state["model_name"], num_classes=int(state["num_classes"]), **state.get("model_kwargs", {}))
    load_weights(model, state)
    set_backend(model, backend)
    return model.to(device).eval()


# What errors call an image size taken from the checkpoint (the user gave no --image-size).
CHECKPOINT_SIZE = "the checkpoint's image size (its model's; --image-size not given)"


def data_for_checkpoint(cfg: DataConfig, state: dict) -> DataConfig:
    """``cfg`` with the checkpoint's image size where ``--image-size`` is not given: the size its model was
    trained at, not the format's default (224 for an ImageFolder tree whatever the run used)."""
    if cfg.image_size is None and state.get("image_size"):
        return dataclasses.replace(cfg, image_size=int(state["image_size"]), image_size_origin=CHECKPOINT_SIZE)
    return cfg


def check_classes(state: dict, classes: Sequence[str]) -> None:
    """ValueError when the data's classes are not the checkpoint's: another number, or other names in another
    order (the labels would be mapped to the wrong outputs)."""
    if len(classes) != int(state["num_classes"]):
        raise ValueError(f"the data has {len(classes)} classes but the checkpoint's model has {state['num_classes']}")
    if state.get("classes") and list(state["classes"]) != list(classes):
        raise ValueError(f"the data's classes {list(classes)} are not the checkpoint's "
                         f"{list(state['classes'])} (labels would be mapped to the wrong outputs)")
