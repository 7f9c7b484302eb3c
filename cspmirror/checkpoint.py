"""Loading checkpoints from local paths (cspmirror never downloads anything)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "ema")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` (a bare state dict, or one nested under a usual key)."""
    text = str(path)
    if "://" in text:
        raise ValueError(f"weights must be a local file path; cspmirror does not download ({text!r})")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in _NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load the weights at ``path`` into ``model`` and return it."""
    model.load_state_dict(read_state_dict(path), strict=strict)
    return model
