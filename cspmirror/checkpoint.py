"""Loading checkpoints from local paths (cspmirror never downloads anything)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection, Iterable
from pathlib import Path

import torch
import torch.nn as nn

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel's, torch.compile's


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
    return {_unwrapped(k): v for k, v in obj.items()}


def _unwrapped(key: str) -> str:
    """``key`` without the prefixes that wrappers of a model add to its state dict's keys."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load the weights at ``path`` into ``model`` and return it.

    The stages a ``features_only`` model does not have (it stops at its last level) are left out, and so is the
    checkpoint's classifier (``pretrained_cfg["classifier"]``, ``fc`` for cspmirror's models)
    where ``model``'s cannot take it: none (``features_only``, ``num_classes=0``) or another number of classes
    (a warning says so; the model's own classifier keeps its fresh initialization), as timm loads pretrained
    weights for fine-tuning.
    """
    state = _without_foreign_classifier(_without_pruned_stages(read_state_dict(path), model), model, path)
    _check_same_folding(state, model, path)
    model.load_state_dict(state, strict=strict)
    return model


def _check_same_folding(state: dict[str, torch.Tensor], model: nn.Module, path: object) -> None:
    """ValueError when the checkpoint or the model has been through :func:`cspmirror.fuse_for_inference` and the
    other has not (a conv's ``conv.bias`` where the other has its ``bn.*``), whatever ``strict``: the load would
    fail with a list of missing keys, or, not strict, leave a model with fresh BatchNorm or conv biases."""
    expected = model.state_dict().keys()
    if _folded_against(state.keys(), expected):
        raise ValueError(f"{str(path)!r} holds a model fused by cspmirror.fuse_for_inference (BatchNorm folded into "
                         f"its convs) and the model is not: fuse the model first, then load")
    if _folded_against(expected, state.keys()):
        raise ValueError(f"the model is fused (cspmirror.fuse_for_inference) and {str(path)!r} is not: load it into "
                         f"the model before fusing")


def _folded_against(keys: Iterable[str], other: Collection[str]) -> bool:
    """Whether ``keys`` have a folded conv's bias where ``other`` has that conv's BatchNorm."""
    folded = (k[:-len("conv.bias")] for k in keys if k.endswith(".conv.bias"))
    return any(f"{prefix}bn.weight" in other or f"{prefix}bn.running_mean" in other for prefix in folded)


def _without_pruned_stages(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A ``features_only`` model that stops at an earlier level has no later stages: their weights are left out
    (a whole model's checkpoint loads into such a backbone, as in timm)."""
    if not getattr(model, "features_only", False):
        return state
    kept = len(model.stages)
    return {k: v for k, v in state.items() if not (k.startswith("stages.") and int(k.split(".")[1]) >= kept)}


def _without_foreign_classifier(state: dict[str, torch.Tensor], model: nn.Module, path: object
                                ) -> dict[str, torch.Tensor]:
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not name:
        return state
    prefix = name + "."
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    theirs = {k: v.shape for k, v in state.items() if k.startswith(prefix)}
    if not theirs or theirs == {k: v.shape for k, v in own.items()}:
        return state
    if own:
        warnings.warn(f"weights {str(path)!r}: the classifier {name!r} ({_classes(state, prefix)} classes) does "
                      f"not fit the model's ({_classes(own, prefix)} classes) and was not loaded; the model's "
                      "own keeps its fresh initialization", stacklevel=3)
    return {**{k: v for k, v in state.items() if k not in theirs}, **own}


def _classes(state: dict[str, torch.Tensor], prefix: str) -> object:
    weight = state.get(prefix + "weight")
    return weight.shape[0] if weight is not None else "?"
