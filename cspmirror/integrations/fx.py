"""torch.fx symbolic tracing of cspmirror models (torchvision's and timm's FX feature extraction).

The fused ops validate their arguments in Python and BatchNormMish2d updates its statistics in place, neither of
which a symbolic trace can follow, so a trace keeps them as single nodes:

- leaf modules (:func:`leaf_modules`): ``BatchNormMish2d``, ``MirrorSplit``, ``MirrorFuse``; the convolutions
  around them stay ordinary ``Conv2d`` nodes, so node names read like timm's (``stages.0.down.conv``,
  ``stages.0.down.bn``, ``stages.0.split``, ``stages.0.fuse``, ...);
- leaf functions (:func:`leaf_functions`): the four public ops of :mod:`cspmirror.ops` (a fused ``ConvBNMish``
  calls ``conv_bn_mish`` directly) and the input check of ``CSPMirrorNet.forward_features``.

>>> from cspmirror.integrations.fx import create_feature_extractor
>>> extractor = create_feature_extractor(model, {"stages.2": "p3", "stages.3": "p4", "stages.4": "p5"})
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import torch.nn as nn

from .. import ops
from ..layers import BatchNormMish2d, MirrorFuse, MirrorSplit
from ..ops import _validate


def leaf_modules() -> list[type[nn.Module]]:
    """Module classes a trace must not enter (each becomes one ``call_module`` node)."""
    return [BatchNormMish2d, MirrorSplit, MirrorFuse]


def leaf_functions() -> list[Callable]:
    """Functions a trace must not enter (each becomes one ``call_function`` node)."""
    return [ops.mirror_split, ops.mirror_fuse, ops.bn_mish, ops.conv_bn_mish, _validate.check_tensor]


def autowrap_modules() -> tuple[ModuleType, ...]:
    """Python modules whose functions are leaves wherever they are called as ``module.function``
    (``ops.conv_bn_mish(...)`` in the layers), besides ``math`` (FX's default)."""
    return (math, ops)


def tracer_kwargs() -> dict:
    """Keyword arguments for :class:`torch.fx.Tracer` and for ``tracer_kwargs`` of torchvision's
    ``create_feature_extractor`` / ``get_graph_node_names`` that trace cspmirror models."""
    return {
        "leaf_modules": leaf_modules(),
        "autowrap_modules": autowrap_modules(),
        "autowrap_functions": leaf_functions(),
    }


def _merged(extra: dict | None) -> dict:
    """:func:`tracer_kwargs` with the leaves of ``extra`` added and its other keys passed through."""
    kwargs, extra = tracer_kwargs(), dict(extra or {})
    kwargs["leaf_modules"] += list(extra.pop("leaf_modules", ()))
    kwargs["autowrap_functions"] += list(extra.pop("autowrap_functions", ()))
    kwargs["autowrap_modules"] = tuple(dict.fromkeys((*kwargs["autowrap_modules"],
                                                      *extra.pop("autowrap_modules", ()))))
    return {**kwargs, **extra}


def get_graph_node_names(model: nn.Module, tracer_kwargs: dict | None = None) -> tuple[list[str], list[str]]:
    """torchvision's ``get_graph_node_names`` for ``model``: (train-mode names, eval-mode names)."""
    from torchvision.models.feature_extraction import get_graph_node_names as tv_get_graph_node_names

    return tv_get_graph_node_names(model, tracer_kwargs=_merged(tracer_kwargs))


def create_feature_extractor(model: nn.Module, return_nodes: list[str] | dict[str, str],
                             tracer_kwargs: dict | None = None, **kwargs) -> nn.Module:
    """torchvision's ``create_feature_extractor`` with cspmirror's leaves added to ``tracer_kwargs``.

    Args:
        model: a module containing cspmirror modules (e.g. a :class:`cspmirror.CSPMirrorNet`).
        return_nodes: node names (see :func:`get_graph_node_names`) or module names such as ``"stages.2"``
            (the output of that module), optionally mapped to output keys.
        kwargs: passed to torchvision (``train_return_nodes``, ``eval_return_nodes``, ...).

    Returns:
        A ``torch.fx.GraphModule`` whose forward returns a dict of tensors [N, C_i, H_i, W_i].
    """
    from torchvision.models.feature_extraction import create_feature_extractor as tv_create

    return tv_create(model, return_nodes, tracer_kwargs=_merged(tracer_kwargs), **kwargs)


__all__ = ["leaf_modules", "leaf_functions", "autowrap_modules", "tracer_kwargs", "get_graph_node_names",
           "create_feature_extractor"]
