"""cspmirror's family in timm's model registry (needs the ``timm`` extra).

Importing this module registers every cspmirror model with timm (:func:`register`, idempotent), after which
timm's own factory builds them through ``timm.models.build_model_with_cfg``, exactly as timm builds its
``cspnet`` models:

>>> import timm, cspmirror.integrations.timm
>>> model = timm.create_model("cspmirrornet53", num_classes=10)                    # a classifier
>>> backbone = timm.create_model("cspmirrornet53", features_only=True, out_indices=(3, 4, 5))
>>> backbone.feature_info.channels(), backbone.feature_info.reduction()          # [256, 512, 1024], [8, 16, 32]

What works as for timm's own models: ``pretrained_cfg`` (input_size, pool_size, crop_pct, interpolation,
mean / std, first_conv, classifier), ``forward_features``, ``forward_head(x, pre_logits=True)``,
``reset_classifier``, ``get_classifier``, ``feature_info``, ``features_only`` with ``out_indices`` and
``feature_cls`` ("list" by default, "dict", "hook", "fx", "getter": timm's wrapper over
``forward_intermediates`` and ``prune_intermediate_layers``) or a ``feature_cfg`` dict, ``global_pool`` ("avg",
"max", "avgmax", "catavgmax", ""), ``output_stride`` (the native one only: no dilation), ``drop_rate`` /
``drop_path_rate``, ``set_grad_checkpointing`` and ``group_matcher`` (layer-wise lr decay), the ablation knobs of
:func:`cspmirror.models.configure` as keywords (``overlap=0.5, siamese=False, ...``), ``checkpoint_path=`` and
local pretrained weights through ``pretrained=True, pretrained_cfg_overlay=dict(file="weights.pth")``.
cspmirror ships no weights: ``pretrained=True`` without a local file raises timm's "No pretrained weights
exist" error, and nothing is downloaded.

FX feature extraction (``feature_cls="fx"``, ``timm.models.create_feature_extractor``) uses the leaves that
:func:`register` declares to timm (see :mod:`cspmirror.integrations.fx`); timm's tracer has no hook for the
``ops.conv_bn_mish`` call of a model fused by :func:`cspmirror.fuse_for_inference`, so trace a fused model with
:func:`cspmirror.integrations.fx.create_feature_extractor` instead.

TorchScript: no cspmirror module is scriptable: ``torch.jit.script`` stops at the modules' Python-only
helpers (the first it meets is ``BatchNormMish2d``'s recomputation check, which reads autograd's graph-task
id) and would stop at the fused ops next (:func:`cspmirror.ops.bn_mish` / ``conv_bn_mish`` have SPEC §3
keyword-only arguments that TorchScript cannot compile, and their backend dispatch imports modules at run time).
``torch.jit.trace(model, x, check_trace=False)`` works on the reference backend, for a fixed input size. For
deployment use :mod:`cspmirror.integrations.export` (``torch.export`` and ONNX), which PyTorch recommends over its
deprecated TorchScript.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..layers import BatchNormMish2d, MirrorFuse, MirrorSplit
from ..models.cspmirrornet import MODEL_CONFIGS, CSPMirrorNet, CSPMirrorNetConfig, configure, pretrained_cfg
from . import fx

try:
    import timm.layers as _timm_layers
    import timm.models as _timm_models
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "cspmirror.integrations.timm needs timm: pip install 'cspmirror[timm]' (or pip install timm)"
    ) from _exc

_KNOBS = frozenset(f.name for f in dataclasses.fields(CSPMirrorNetConfig)) | {"split_stages"}

#: timm's per-architecture pretrained configs, read by ``timm.models.register_model`` from this module.
default_cfgs: dict = {}


def timm_pretrained_cfg(name: str) -> dict:
    """The timm ``pretrained_cfg`` of family member ``name`` (1000 classes, 3 input channels, no weights)."""
    cfg = pretrained_cfg(name, MODEL_CONFIGS[name], num_classes=1000, in_chans=3)
    cfg.pop("architecture", None)  # timm fills in architecture (and tag) itself
    return dict(cfg, license="apache-2.0", paper_name="CSPMirrorNet", fixed_input_size=False)


def _create(variant: str, pretrained: bool = False, **kwargs) -> CSPMirrorNet:
    """Build ``variant`` through ``timm.models.build_model_with_cfg``; knobs go to the architecture config.

    Knobs that change the data config (``mean``, ``std``, ``default_size``, the number of stages) update the
    model's ``pretrained_cfg`` as :func:`cspmirror.models.build_model` does (a ``pretrained_cfg_overlay`` given
    wins); a ``feature_cfg`` given is merged over the default one."""
    knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in _KNOBS}
    split_stages = knobs.pop("split_stages", None)
    cfg = configure(MODEL_CONFIGS[variant], split_stages=split_stages, **knobs)
    num_levels = len(cfg.stages) + 1
    default = pretrained_cfg(variant, MODEL_CONFIGS[variant], num_classes=1000, in_chans=3)
    current = pretrained_cfg(variant, cfg, num_classes=1000, in_chans=3)
    data = {k: current[k] for k in ("input_size", "pool_size", "mean", "std") if current[k] != default[k]}
    if data:
        kwargs["pretrained_cfg_overlay"] = {**data, **(kwargs.get("pretrained_cfg_overlay") or {})}
    feature_cfg = dict(flatten_sequential=True, out_indices=tuple(range(num_levels)))
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    return _timm_models.build_model_with_cfg(
        CSPMirrorNet, variant, pretrained, model_cfg=cfg, feature_cfg=feature_cfg, **kwargs,
    )


def _entrypoint(name: str) -> Callable[..., CSPMirrorNet]:
    def build(pretrained: bool = False, **kwargs) -> CSPMirrorNet:
        return _create(name, pretrained=pretrained, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"timm entrypoint of ``{name}`` (SPEC §2); keywords as for ``timm.create_model``."
    return build


def register() -> list[str]:
    """Register every cspmirror model with timm (idempotent); returns the names registered.

    Also declares cspmirror's FX leaves (:mod:`cspmirror.integrations.fx`) to timm, so that
    ``feature_cls="fx"`` and ``timm.models.create_feature_extractor`` trace cspmirror models.
    """
    names = sorted(MODEL_CONFIGS)
    if all(name in default_cfgs and _timm_models.is_model(name) for name in names):
        return names
    default_cfgs.update(_timm_models.generate_default_cfgs({n: timm_pretrained_cfg(n) for n in names}))
    for name in names:
        fn = _entrypoint(name)
        globals()[name] = fn  # register_model lists the name in this module's __all__
        _timm_models.register_model(fn)
    for module in (BatchNormMish2d, MirrorSplit, MirrorFuse):
        _timm_layers.register_notrace_module(module)
    for function in fx.leaf_functions():
        _timm_layers.register_notrace_function(function)
    return names


__all__ = ["register", "timm_pretrained_cfg", "default_cfgs"]

register()
