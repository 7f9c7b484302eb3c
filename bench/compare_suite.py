"""The comparison the paper claims: the CSPMirrorNet family against CSPDarknet53 (timm; with Mish as in
YOLOv4 and with timm's default LeakyReLU), ResNet-50 and DenseNet-121 (torchvision, ``weights=None``):
parameters, GMACs at 256x256, activation and peak training memory, training throughput, side by side in
one run, every model eager PyTorch (the cspmirror models on the reference backend)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from cspmirror import get_model, set_backend
from cspmirror.profile import count_gmacs, count_params
from cspmirror.progress import progress_bar

from . import harness
from .training import Measure, measure_fitting


@dataclass(frozen=True)
class Contender:
    name: str
    source: str                      # cspmirror | timm | torchvision
    build: Callable[[], nn.Module]


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm  # optional: the contender is skipped when timm is absent
        return timm.create_model(name, pretrained=False, **kwargs)
    return build


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision
        return getattr(torchvision.models, name)(weights=None)
    return build


def _cspmirror(name: str) -> Callable[[], nn.Module]:
    return lambda: set_backend(get_model(name), "reference")


CONTENDERS = (  # most telling first: a time budget cuts from the end
    Contender("cspmirrornet53", "cspmirror", _cspmirror("cspmirrornet53")),
    Contender("cspdarknet53 (mish)", "timm", _timm("cspdarknet53", act_layer="mish")),
    Contender("cspdarknet53 (leaky)", "timm", _timm("cspdarknet53")),
    Contender("resnet50", "torchvision", _torchvision("resnet50")),
    Contender("densenet121", "torchvision", _torchvision("densenet121")),
    Contender("cspmirrornet_s", "cspmirror", _cspmirror("cspmirrornet_s")),
    Contender("cspmirrornet_tiny", "cspmirror", _cspmirror("cspmirrornet_tiny")),
)


@dataclass(frozen=True)
class ComparePlan:
    resolution: int
    batch: int
    dtype: torch.dtype
    warmup: int
    repeats: int


def plan_for(device: torch.device, quick: bool, dtype: torch.dtype | None) -> ComparePlan:
    if device.type == "cuda":
        return ComparePlan(256, 16 if quick else 64, dtype or torch.bfloat16, 3, 5 if quick else 10)
    return ComparePlan(256 if not quick else 128, 2, dtype or torch.float32, 1, 2 if quick else 3)


def run_contender(c: Contender, plan: ComparePlan, device: torch.device) -> dict:
    row = {"suite": "compare", "model": c.name, "source": c.source, "resolution": plan.resolution,
           "dtype": str(plan.dtype).removeprefix("torch.")}
    t0 = time.perf_counter()
    try:
        model = c.build()
        row.update(params_m=count_params(model) / 1e6, gmacs_256=count_gmacs(model, 256))
        m = Measure("train", plan.batch, plan.resolution, plan.dtype, plan.warmup, plan.repeats)
        row.update(measure_fitting(lambda: model.to(device).train(), m, device))
    except Exception as exc:  # noqa: BLE001
        reason = harness.skip_reason(exc)
        return {**row, "status": "skip" if reason else "error", "reason": reason or harness.short_error(exc)}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**row, "status": "ok", "wall_s": round(time.perf_counter() - t0, 1)}


def run(plan: ComparePlan, device: torch.device, deadline: harness.Deadline,
        on_row: Callable[[dict], None], progress: bool = True, only: str | None = None) -> None:
    contenders = [c for c in CONTENDERS if not only or only in c.name]
    bar = progress_bar(contenders, f"compare on {device}", enabled=progress)
    for c in bar:
        bar.set_postfix_str(c.name)
        if deadline.remaining() <= 0:
            on_row({"suite": "compare", "model": c.name, "source": c.source, "status": "skip",
                    "reason": "time budget"})
            continue
        with harness.time_limit(deadline.remaining()):
            on_row(run_contender(c, plan, device))
