"""Whole-model benchmarks: a CSPMirrorNet training step and fused inference, per backend, eager and
under torch.compile, in bf16 and fp32. Cases run cheapest and most telling first (eager before compiled),
so that a time budget cuts the costly compiles, never the baselines."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from cspmirror import backends, fuse_for_inference, get_model, set_backend
from cspmirror.progress import progress_bar

from . import harness
from .training import Measure, measure_fitting


@dataclass(frozen=True)
class ModelCase:
    model: str
    mode: str          # train | infer
    backend: str       # reference | triton | extension
    compiled: bool
    dtype: torch.dtype
    batch: int
    resolution: int
    checkpointing: bool = False  # model.set_grad_checkpointing() (training only)

    @property
    def name(self) -> str:
        c = ("+compile" if self.compiled else "") + ("+ckpt" if self.checkpointing else "")
        return f"{self.model} {self.mode} {self.backend}{c} {str(self.dtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class ModelPlan:
    """Which model, sizes and variants a device runs."""

    model: str
    resolution: int
    batches: dict[tuple[str, torch.dtype], int]   # (mode, dtype) -> batch
    backends: tuple[str, ...]
    compiled_backends: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    warmup: int
    repeats: int
    compile_min_s: float
    compiled_modes: tuple[str, ...] = ("train", "infer")
    checkpointed_backends: tuple[str, ...] = ("reference",)  # training with gradient checkpointing


def plan_for(device: torch.device, quick: bool, dtypes: tuple[torch.dtype, ...] | None) -> ModelPlan:
    bf16, fp32 = torch.bfloat16, torch.float32
    if device.type == "cuda":
        batches = {("train", bf16): 64, ("train", fp32): 32, ("infer", bf16): 128, ("infer", fp32): 64}
        if quick:
            batches = {k: max(v // 8, 2) for k, v in batches.items()}
        return ModelPlan("cspmirrornet_s" if quick else "cspmirrornet53", 128 if quick else 256, batches,
                         ("reference", "triton", "extension"), ("triton", "reference"),
                         dtypes or (bf16, fp32), 3, 10 if quick else 15, compile_min_s=60.0,
                         checkpointed_backends=("triton", "reference"))
    batches = {("train", fp32): 2 if quick else 4, ("infer", fp32): 4 if quick else 8,
               ("train", bf16): 2, ("infer", bf16): 4}
    # Inductor's C++ compile of a training graph is slow on small CPUs (556 s for cspmirrornet_s on a
    # shared 2-core machine, 188 s for its inference graph): --quick compiles inference only.
    return ModelPlan("cspmirrornet_s", 128 if quick else 224, batches, ("reference", "extension"),
                     ("reference",), dtypes or (fp32,), 1, 3 if quick else 5, compile_min_s=90.0,
                     compiled_modes=("infer",) if quick else ("train", "infer"))


def model_cases(plan: ModelPlan) -> list[ModelCase]:
    """Every case, in the order a time budget should cut them last-first: all eager cases (cheap and
    the baselines), eager training with gradient checkpointing in the first dtype, then compiled training
    and inference of the first dtype, then the other dtypes'."""
    eager = [ModelCase(plan.model, mode, b, False, d, plan.batches[(mode, d)], plan.resolution)
             for d in plan.dtypes for b in plan.backends for mode in ("train", "infer")]
    first = plan.dtypes[0]
    checkpointed = [ModelCase(plan.model, "train", b, False, first, plan.batches[("train", first)],
                              plan.resolution, checkpointing=True) for b in plan.checkpointed_backends]
    compiled = [ModelCase(plan.model, mode, b, True, d, plan.batches[(mode, d)], plan.resolution)
                for d in plan.dtypes for mode in plan.compiled_modes for b in plan.compiled_backends]
    return eager + checkpointed + compiled


def backend_skip(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run whole models on ``device`` (None: it can)."""
    if backend == "triton":
        if device.type != "cuda":
            return "Triton on the CPU is interpreter-only: not timed"
        status = backends.triton_status(device)
    elif backend == "extension":
        status = backends.extension_status()
    else:
        return None
    return None if status.available else status.reason


def builder(case: ModelCase, master: nn.Module, device: torch.device) -> Callable[[], nn.Module]:
    """A function making a fresh copy of ``master`` set up for ``case`` (backend, mode, dtype)."""
    def build() -> nn.Module:
        model = copy.deepcopy(master).to(device)
        if case.mode == "train":
            model.set_grad_checkpointing(case.checkpointing)
            return set_backend(model.train(), case.backend)
        return fuse_for_inference(model, backend=case.backend).to(case.dtype)
    return build


def base_row(case: ModelCase) -> dict:
    return {"suite": "models", "model": case.model, "mode": case.mode, "backend": case.backend,
            "compiled": case.compiled, "checkpointing": case.checkpointing,
            "dtype": str(case.dtype).removeprefix("torch."), "batch": case.batch,
            "resolution": case.resolution}


def run_case(case: ModelCase, plan: ModelPlan, master: nn.Module, device: torch.device,
             deadline: harness.Deadline) -> dict:
    row = base_row(case)
    reason = backend_skip(case.backend, device)
    if reason:
        return {**row, "status": "skip", "reason": reason}
    if case.compiled and not deadline.allows(plan.compile_min_s):
        return {**row, "status": "skip", "reason": "time budget: no compile started this late"}
    m = Measure(case.mode, case.batch, case.resolution, case.dtype, plan.warmup, plan.repeats, case.compiled)
    t0 = time.perf_counter()
    try:
        with harness.time_limit(deadline.remaining()):
            if case.compiled:
                torch._dynamo.reset()
            result = measure_fitting(builder(case, master, device), m, device)
    except Exception as exc:  # noqa: BLE001 - record and go on
        reason = harness.skip_reason(exc)
        return {**row, "status": "skip" if reason else "error", "reason": reason or harness.short_error(exc)}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**row, **result, "status": "ok", "wall_s": round(time.perf_counter() - t0, 1)}


def run(plan: ModelPlan, device: torch.device, deadline: harness.Deadline, on_row: Callable[[dict], None],
        progress: bool = True, only: str | None = None) -> None:
    master = get_model(plan.model)
    cases = [c for c in model_cases(plan) if not only or only in c.name]
    bar = progress_bar(cases, f"models on {device}", enabled=progress)
    for case in bar:
        bar.set_postfix_str(case.name)
        if deadline.remaining() <= 0:
            on_row({**base_row(case), "status": "skip", "reason": "time budget"})
            continue
        on_row(run_case(case, plan, master, device, deadline))
