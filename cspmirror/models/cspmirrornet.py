"""CSPMirrorNet: config dataclasses, one model class, the family (SPEC §2).

Mirrors the shape of timm's ``cspnet.py``: a frozen config per architecture, one builder, a registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..accelerate import preload
from ..layers import ConvBNMish, CSPMirrorStage, check_drop_path_rate, check_stage_knobs
from ..ops._validate import check_tensor
from .registry import register_model

# timm's marker for "the group before" (timm.models._manipulate.MATCH_PREV_GROUP; timm is optional here).
MATCH_PREV_GROUP = (99999,)


@dataclass(frozen=True)
class StageConfig:
    out_chs: int
    depth: int
    expand_ratio: float = 1.0
    block_ratio: float = 0.5
    split: bool = True


@dataclass(frozen=True)
class CSPMirrorNetConfig:
    """Architecture of one family member; every ablation knob of SPEC §2 is a field."""

    stem_chs: int
    stages: tuple[StageConfig, ...]
    overlap: float = 0.25
    axis: int = -1
    mirror: bool = True
    siamese: bool = True
    reduce: str = "sum"
    fusion: str = "sum_concat"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    default_size: int = 256
    extra: dict = field(default_factory=dict)


def _stages(chs: Sequence[int], depths: Sequence[int], expand: Sequence[float],
            block: Sequence[float]) -> tuple[StageConfig, ...]:
    return tuple(StageConfig(c, d, e, b) for c, d, e, b in zip(chs, depths, expand, block, strict=True))


MODEL_CONFIGS: dict[str, CSPMirrorNetConfig] = {
    "cspmirrornet_tiny": CSPMirrorNetConfig(
        stem_chs=16,
        stages=_stages((32, 64, 128, 256), (1, 1, 2, 1), (2, 1, 1, 1), (1, 0.5, 0.5, 0.5)),
        default_size=32,
    ),
    "cspmirrornet_s": CSPMirrorNetConfig(
        stem_chs=16,
        stages=_stages((32, 64, 128, 256, 512), (1, 1, 3, 3, 2), (2, 1, 1, 1, 1), (1, 0.5, 0.5, 0.5, 0.5)),
    ),
    "cspmirrornet53": CSPMirrorNetConfig(
        stem_chs=32,
        stages=_stages((64, 128, 256, 512, 1024), (1, 2, 8, 8, 4), (2, 1, 1, 1, 1), (1, 0.5, 0.5, 0.5, 0.5)),
    ),
}


def configure(cfg: CSPMirrorNetConfig, split_stages: Sequence[bool] | Sequence[int] | None = None,
              **overrides) -> CSPMirrorNetConfig:
    """Return ``cfg`` with knobs replaced.

    Args:
        split_stages: which stages split, as one bool per stage or as the 0-based indices that split.
        overrides: any :class:`CSPMirrorNetConfig` field (overlap, mirror, siamese, reduce, fusion, axis, ...).
    """
    unknown = set(overrides) - {f.name for f in dataclasses.fields(CSPMirrorNetConfig)}
    if unknown:
        raise TypeError(f"unknown model argument(s): {sorted(unknown)}")
    for name in ("mirror", "siamese"):
        if name in overrides and not isinstance(overrides[name], bool):
            raise TypeError(f"{name} must be True or False, got {overrides[name]!r}")
    cfg = dataclasses.replace(cfg, **overrides)
    check_stage_knobs(cfg.overlap, cfg.axis, cfg.reduce, cfg.fusion)
    if split_stages is not None:
        n = len(cfg.stages)
        flags = list(split_stages)
        if not flags or not all(isinstance(f, bool) for f in flags):
            if any(not isinstance(i, int) or not -n <= i < n for i in flags):
                raise ValueError(f"split_stages must be {n} bools or stage indices in [0, {n}), got {flags}")
            chosen = {i % n for i in flags}
            flags = [i in chosen for i in range(n)]
        if len(flags) != n:
            raise ValueError(f"split_stages must have one bool per stage ({n}), got {len(flags)}")
        cfg = dataclasses.replace(
            cfg, stages=tuple(dataclasses.replace(s, split=f) for s, f in zip(cfg.stages, flags, strict=True))
        )
    return cfg


#: ``global_pool`` values, as timm's ``SelectAdaptivePool2d`` names them ("": no pooling).
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "")


class _AvgMaxPool2d(nn.Module):
    """timm's avgmax (the mean of global average and max pooling) or catavgmax (both, concatenated)."""

    def __init__(self, concat: bool):
        super().__init__()
        self.concat = concat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg, top = F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)
        return torch.cat([avg, top], dim=1) if self.concat else 0.5 * (avg + top)


def _global_pool(pool_type: str) -> nn.Module:
    if pool_type not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS} ('': no pooling), got {pool_type!r}")
    if pool_type == "avg":
        return nn.AdaptiveAvgPool2d(1)
    if pool_type == "max":
        return nn.AdaptiveMaxPool2d(1)
    return _AvgMaxPool2d(pool_type == "catavgmax") if pool_type else nn.Identity()


def _drop_path_rates(cfg: CSPMirrorNetConfig, drop_path_rate: float) -> list[list[float]]:
    """Per stage, the stochastic-depth rate of each dense block: 0 to ``drop_path_rate`` over all blocks."""
    depths = [s.depth for s in cfg.stages]
    last, blocks = check_drop_path_rate(drop_path_rate), sum(depths)
    rates = [last * i / max(blocks - 1, 1) for i in range(blocks)]
    return [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]


class CSPMirrorNet(nn.Module):
    """The CSPMirrorNet backbone and classifier.

    Input [N, in_chans, H, W]; logits [N, num_classes]. Level 0 is the stem (reduction 1); level i is
    stage i (reduction 2**i). With ``features_only=True``, ``forward`` returns the levels in
    ``out_indices`` (in that order; negative indices count from the end, an int n means the last n levels) as
    a list of [N, C_i, H / r_i, W / r_i], described by ``feature_info`` in the same order. ``drop_rate``:
    dropout before the classifier; ``drop_path_rate``: stochastic depth of the dense blocks, rising linearly to
    this rate at the last block (as timm's models); both 0 in the paper's model.
    """

    def __init__(
        self,
        cfg: CSPMirrorNetConfig,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
        output_stride: int | None = None,
    ):
        super().__init__()
        native_stride = 2 ** len(cfg.stages)
        if output_stride is not None and output_stride != native_stride:
            raise ValueError(f"output_stride={output_stride} is not supported: this model's output stride is fixed "
                             f"at {native_stride} (no dilated stages)")
        self.cfg = cfg
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stem = ConvBNMish(in_chans, cfg.stem_chs, 3, stride=1)
        stages, c_in = [], cfg.stem_chs
        self.feature_info = [dict(num_chs=cfg.stem_chs, reduction=1, module="stem")]
        for i, (s, rates) in enumerate(zip(cfg.stages, _drop_path_rates(cfg, drop_path_rate), strict=True)):
            stages.append(CSPMirrorStage(
                c_in, s.out_chs, s.depth, s.expand_ratio, s.block_ratio, split=s.split,
                overlap=cfg.overlap, axis=cfg.axis, mirror=cfg.mirror, siamese=cfg.siamese,
                reduce=cfg.reduce, fusion=cfg.fusion, drop_path=rates,
            ))
            c_in = s.out_chs
            self.feature_info.append(dict(num_chs=c_in, reduction=2 ** (i + 1), module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.grad_checkpointing = False
        self.num_features = c_in
        self.head_hidden_size = c_in

        self.features_only = features_only
        num_levels = len(self.feature_info)
        if out_indices is None:
            out_indices = tuple(range(num_levels))
        elif isinstance(out_indices, int):  # timm's convention: the last n levels
            if not 1 <= out_indices <= num_levels:
                raise ValueError(f"out_indices={out_indices} asks for the last {out_indices} levels; this model "
                                 f"has {num_levels}")
            out_indices = tuple(range(num_levels - out_indices, num_levels))
        out_indices = tuple(out_indices)
        bad = [i for i in out_indices if not -num_levels <= i < num_levels]
        if bad:
            raise ValueError(f"out_indices {bad} are out of range: this model has levels 0..{num_levels - 1}")
        self.out_indices = tuple(i % num_levels for i in out_indices)

        if features_only:
            self.feature_info = [self.feature_info[i] for i in self.out_indices]
            # as timm's feature models: no stage after the last level asked for (it would cost time, update
            # BatchNorm statistics from outputs nobody uses, and leave parameters without gradients under DDP)
            self._drop_stages_after(max(self.out_indices))
            self.global_pool, self.head_drop, self.fc = None, None, None
        else:
            self.reset_classifier(num_classes, global_pool)
        self._init_weights()
        preload(self)  # (and on every move: cspmirror.layers.PreloadOnMove)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one of ``num_classes`` outputs (0: identity)."""
        if global_pool is not None:
            self.global_pool = _global_pool(global_pool)
            self.global_pool_type = global_pool
        if self.features_only and num_classes > 0:
            raise ValueError("a features_only model has no head: build it with features_only=False for a classifier")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {num_classes}")
        if num_classes > 0 and not self.global_pool_type:
            raise ValueError("a classifier needs pooling: with global_pool='' use num_classes=0")
        self.num_classes = num_classes
        self.head_drop = nn.Dropout(self.drop_rate)
        # catavgmax doubles the pooled features (timm's feat_mult), which the classifier and pre_logits see
        self.head_hidden_size = self.num_features * (2 if self.global_pool_type == "catavgmax" else 1)
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in the backward instead of keeping its activations (``torch.utils.checkpoint``,
        non-reentrant), as timm's models do; training only, any backend. BatchNorm running statistics are
        updated once per step, not again by the recomputation (see :class:`cspmirror.BatchNormMish2d`)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (layer-wise learning-rate decay, ``timm.optim``): the stem, then one
        group per stage (``coarse``) or per dense block, a stage's transition and final conv joining its last
        block and its down-sampling conv its first."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.branches\.\d+\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.(?:branches\.\d+\.transition|final)", MATCH_PREV_GROUP),
                (r"^stages\.(\d+)", (0,)),
            ],
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_chans, H, W] -> [N, num_features, H / 2**S, W / 2**S]."""
        x = self.stem(check_tensor(x, "x"))
        for stage in self.stages:
            x = self._stage(stage, x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: the levels ``indices`` (the last n when an int, all when None; negative
        indices count from the end) as a list of [N, C_i, H / r_i, W / r_i], with the final features
        [N, num_features, h, w] before them unless ``intermediates_only``. ``stop_early`` skips the stages
        after the last level asked for; ``norm`` is accepted for timm's sake (the model has no final norm)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, last = self._take_indices(indices)
        outs = []
        x = self.stem(check_tensor(x, "x"))
        if 0 in take:
            outs.append(x)
        stages = self.stages[:last] if stop_early else self.stages
        for i, stage in enumerate(stages, start=1):
            x = self._stage(stage, x)
            if i in take:
                outs.append(x)
        return outs if intermediates_only else (x, outs)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's: drop the stages after the last level in ``indices`` and (``prune_head``, or whenever stages
        were dropped) the classifier; returns the levels kept, as :meth:`forward_intermediates` takes them."""
        take, last = self._take_indices(indices)
        pruned = last < len(self.stages)
        if pruned:
            self._drop_stages_after(last)
        if prune_head or pruned:
            self.reset_classifier(0, "")
        return take

    def _take_indices(self, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
        """(levels, the last of them) for timm's ``indices`` (see :meth:`forward_intermediates`)."""
        levels = len(self.stages) + 1
        if indices is None:
            indices = levels
        if isinstance(indices, int):
            if not 0 < indices <= levels:
                raise ValueError(f"indices must be in [1, {levels}] as a count of levels, got {indices}")
            take = list(range(levels - indices, levels))
        else:
            bad = [i for i in indices if not -levels <= i < levels]
            if bad or not len(indices):
                raise ValueError(f"indices must be levels in [{-levels}, {levels}), got {list(indices)}")
            take = [i % levels for i in indices]
        return take, max(take)

    def _drop_stages_after(self, level: int) -> None:
        """Keep only the stages up to ``level`` (0: the stem alone); the last kept level is the features'."""
        self.stages = self.stages[:level]
        self.num_features = self.head_hidden_size = self._level_channels(level)

    def _level_channels(self, level: int) -> int:
        return self.cfg.stem_chs if level == 0 else self.cfg.stages[level - 1].out_chs

    def _stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``stage(x)``, in a checkpointed region when grad checkpointing is on and autograd records."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[N, num_features, h, w] -> logits [N, num_classes] (pooled features with ``pre_logits``)."""
        x = self.global_pool(x)
        if self.global_pool_type:
            x = x.flatten(1)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:  # the levels in the order (and number) of out_indices, as feature_info lists them
            levels = sorted(set(self.out_indices))
            found = dict(zip(levels, self.forward_intermediates(x, levels, intermediates_only=True), strict=True))
            return [found[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))


def build_model(name: str, *, weights: str | None = None, num_classes: int = 1000, in_chans: int = 3,
                drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg",
                features_only: bool = False, out_indices: int | Sequence[int] | None = None,
                split_stages: Sequence | None = None, **knobs) -> CSPMirrorNet:
    """Build family member ``name``; ``knobs`` override config fields (overlap, mirror, siamese, ...).

    ``weights`` is a local checkpoint path (nothing is ever downloaded). Its classifier is not loaded where the
    model has none (``features_only``, ``num_classes=0``) or one of another size (a warning says so; the new
    one keeps its fresh initialization), as timm loads pretrained weights for fine-tuning.
    """
    cfg = configure(MODEL_CONFIGS[name], split_stages=split_stages, **knobs)
    model = CSPMirrorNet(cfg, in_chans=in_chans, num_classes=num_classes, drop_rate=drop_rate,
                         global_pool=global_pool, features_only=features_only, out_indices=out_indices,
                         drop_path_rate=drop_path_rate)
    model.default_cfg = model.pretrained_cfg = pretrained_cfg(name, cfg, num_classes, in_chans)
    if weights is not None:
        from ..checkpoint import load_checkpoint

        load_checkpoint(model, weights)
    return model


def pretrained_cfg(name: str, cfg: CSPMirrorNetConfig, num_classes: int, in_chans: int) -> dict:
    """timm-style metadata (no URL: cspmirror ships no weights)."""
    size = cfg.default_size
    reduction = 2 ** len(cfg.stages)
    return dict(
        architecture=name, url="", num_classes=num_classes, input_size=(in_chans, size, size),
        pool_size=(max(size // reduction, 1),) * 2, crop_pct=0.887, interpolation="bilinear",
        mean=cfg.mean, std=cfg.std, first_conv="stem.conv", classifier="fc",
    )


def _builder(name: str):
    def build(*, weights: str | None = None, num_classes: int = 1000, **kwargs) -> CSPMirrorNet:
        return build_model(name, weights=weights, num_classes=num_classes, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"Build ``{name}`` (SPEC §2). ``weights``: a local checkpoint path or None."
    return register_model(build)


cspmirrornet_tiny = _builder("cspmirrornet_tiny")
cspmirrornet_s = _builder("cspmirrornet_s")
cspmirrornet53 = _builder("cspmirrornet53")
