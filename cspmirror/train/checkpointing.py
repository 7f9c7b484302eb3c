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

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..fuse import set_backend
from ..models import get_model

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


def load_checkpoint_dict(path: str | os.PathLike) -> dict:
    """The checkpoint dict at ``path`` (a file or a run folder), on the CPU; checks it is a training one."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch.save file at all (text, CSV, truncated): no pickle traceback
        raise ValueError(f"{str(path)!r} is not a cspmirror training checkpoint (torch.load failed: "
                         f"{type(exc).__name__})") from None
    missing = [k for k in ("model", "model_name", "num_classes") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{str(path)!r} is not a cspmirror training checkpoint (missing {missing})")
    return state


def model_from_checkpoint(state: dict, device: torch.device | str = "cpu", backend: str = "auto") -> nn.Module:
    """Rebuild the checkpoint's model (architecture knobs included), load its weights, eval mode."""
    model = get_model(state["model_name"], num_classes=int(state["num_classes"]), **state.get("model_kwargs", {}))
    model.load_state_dict(state["model"])
    set_backend(model, backend)
    return model.to(device).eval()
