"""Training recipes: one frozen dataclass holds every hyper-parameter; named presets fill it in.

``paper`` is the CIFAR-10 recipe of the CSPMirrorNet paper (section VI.A): SGD with lr 0.1, momentum 0.9 and
weight decay 5e-4, a step schedule (every 25 epochs, gamma 0.5), batch 128, 100 epochs, no augmentation, no
dropout, full fp32.

``modern`` is what we would use today for a small CNN on CIFAR-10: random crop (padding 4) and horizontal
flip, SGD with Nesterov momentum (lr 0.1, momentum 0.9, weight decay 5e-4 on conv/linear weights only, none
on BatchNorm parameters and biases), a cosine schedule down to 0 after 5 epochs of linear warm-up (at most a
fifth of the run: 1 epoch of a 5-epoch run, see :func:`get_recipe`), label smoothing 0.1 and mixed precision
(bf16 on CPUs; bf16 on GPUs that support it, fp16 with a gradient scaler otherwise). ``--optimizer adamw`` is
available too (then e.g. ``--lr 2e-3 --weight-decay 0.05``).

Both schedules are evaluated per optimizer step (:func:`lr_factor`); the ``step`` schedule only changes at
epoch boundaries, so it is exactly ``StepLR(step_size, gamma)`` stepped once per epoch.

``batch_size`` is the *global* batch: under DistributedDataParallel each of the W processes takes
``batch_size / W`` samples, so a recipe means the same thing on any number of devices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant")
AMP_DTYPES = ("auto", "bf16", "fp16")


# The largest magnitude a float field may have: the optimizer applies the learning rate, weight decay, ... to float32
# parameters, and a value past float32's range fails at the first step ("cannot be converted ... without overflow").
FLOAT_FIELD_MAX = float(torch.finfo(torch.float32).max)


class RecipeError(ValueError):
    """A recipe field has a value that cannot work; the message names the field."""


@dataclass(frozen=True)
class Recipe:
    """Every hyper-parameter of a training run (each is a CLI flag: ``--weight-decay`` sets ``weight_decay``)."""

    epochs: int = 100
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = True
    schedule: str = "step"
    step_size: int = 25
    gamma: float = 0.5
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = False
    amp: bool = False
    amp_dtype: str = "auto"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
            ("lr", self.lr > 0, "must be > 0"),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("schedule", self.schedule in SCHEDULES, f"must be one of {SCHEDULES}"),
            ("step_size", self.step_size >= 1, "must be >= 1"),
            ("gamma", self.gamma > 0, "must be > 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            ("amp_dtype", self.amp_dtype in AMP_DTYPES, f"must be one of {AMP_DTYPES}"),
            ("drop_rate", 0 <= self.drop_rate < 1, "must be in [0, 1)"),
            ("drop_path_rate", 0 <= self.drop_path_rate < 1, "must be in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
        ]
        for f in dataclasses.fields(self):  # inf passes every range check below, then trains on NaN
            value = getattr(self, f.name)
            if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT_FIELD_MAX):
                raise RecipeError(f"recipe field {f.name} (--{f.name.replace('_', '-')}) must be finite, within "
                                  f"float32's range (magnitude <= {FLOAT_FIELD_MAX:.4g}), got {value!r}")
        for name, ok, rule in checks:
            if not ok:
                raise RecipeError(f"recipe field {name} (--{name.replace('_', '-')}) {rule}, "
                                  f"got {getattr(self, name)!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise RecipeError("recipe field nesterov (--nesterov) needs --optimizer sgd and --momentum > 0 "
                              "(--no-nesterov to leave it out)")
        if self.amp_dtype != "auto" and not self.amp:  # else ignored: AMP is off
            raise RecipeError(f"recipe field amp_dtype (--amp-dtype) {self.amp_dtype} needs --amp (this recipe "
                              f"trains without autocast)")

    def with_overrides(self, **overrides: object) -> Recipe:
        """A copy with the given fields replaced; ``None`` values are ignored (flag not given)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {unknown}; known: {sorted(names)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        sgd_momentum = given.get("optimizer", self.optimizer) == "sgd" and given.get("momentum", self.momentum) > 0
        if self.nesterov and "nesterov" not in given and not sgd_momentum:
            given["nesterov"] = False  # the preset's Nesterov goes with its SGD momentum, e.g. --optimizer adamw
        return dataclasses.replace(self, **given)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(),
    "modern": Recipe(
        nesterov=True, decay_norm_and_bias=False, schedule="cosine", warmup_epochs=5.0,
        label_smoothing=0.1, augment=True, amp=True,
    ),
}

# A preset's warm-up takes at most this fraction of a run: the modern preset's 5 epochs are meant for runs of 25
# epochs and more, and a run of 5 epochs or less would never leave them (its learning rate never at the peak, its
# cosine never started). A --warmup-epochs given is kept as it is (and must be < --epochs: check_warmup_ends).
PRESET_WARMUP_FRACTION = 0.2

# Fields whose value is one of a fixed set (the CLI offers them as choices).
FIELD_CHOICES: dict[str, tuple[str, ...]] = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "amp_dtype": AMP_DTYPES}

# One line of help per field, for the generated CLI flags.
FIELD_HELP: dict[str, str] = {
    "epochs": "number of epochs",
    "batch_size": "global batch size (split across DDP processes)",
    "optimizer": f"one of {OPTIMIZERS}",
    "lr": "peak learning rate",
    "momentum": "SGD momentum (AdamW: beta1)",
    "nesterov": "Nesterov momentum (SGD only)",
    "weight_decay": "weight decay",
    "decay_norm_and_bias": "apply weight decay to BatchNorm parameters and biases too",
    "schedule": f"learning-rate schedule, one of {SCHEDULES}",
    "step_size": "epochs between decays of the step schedule",
    "gamma": "decay factor of the step schedule",
    "warmup_epochs": "epochs of linear warm-up (any schedule), < --epochs; a preset's is at most "
                     f"{PRESET_WARMUP_FRACTION:.0%} of the run",
    "min_lr_ratio": "final lr / peak lr of the cosine schedule",
    "label_smoothing": "label smoothing of the training loss",
    "augment": "random crop (padding 4) + horizontal flip",
    "amp": "automatic mixed precision",
    "amp_dtype": f"autocast dtype, one of {AMP_DTYPES} (auto: bf16 on CPU, bf16 or fp16 on CUDA)",
    "drop_rate": "dropout before the classifier",
    "drop_path_rate": "stochastic depth of the dense blocks (its rate at the last block)",
    "grad_clip": "clip the gradient norm to this value (0: off)",
}


def get_recipe(name: str, **overrides: object) -> Recipe:
    """The named recipe with ``overrides`` applied (``None`` values ignored); unless ``warmup_epochs`` is among
    them, the preset's warm-up is capped at :data:`PRESET_WARMUP_FRACTION` of the run (:func:`preset_warmup`)."""
    if name not in RECIPES:
        raise RecipeError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    recipe = RECIPES[name].with_overrides(**overrides)
    if overrides.get("warmup_epochs") is not None:
        return recipe
    return dataclasses.replace(recipe, warmup_epochs=preset_warmup(RECIPES[name], recipe.epochs))


def preset_warmup(preset: Recipe, epochs: int) -> float:
    """The warm-up ``preset`` gives a run of ``epochs``: its own, capped at :data:`PRESET_WARMUP_FRACTION` of
    the run."""
    return min(preset.warmup_epochs, PRESET_WARMUP_FRACTION * epochs)


def check_warmup_ends(recipe: Recipe) -> None:
    """RecipeError naming ``--warmup-epochs`` when the run would end inside its warm-up (the learning rate
    never at its peak; the cosine or step schedule never started)."""
    if recipe.warmup_epochs >= recipe.epochs:  # (epochs >= 1: no warm-up always ends)
        raise RecipeError(f"recipe field warmup_epochs (--warmup-epochs) must be < epochs (--epochs), got "
                          f"{recipe.warmup_epochs:g} for {recipe.epochs} epochs: the run would end before its learning "
                          f"rate reaches the peak (--warmup-epochs 0: no warm-up)")


def lr_factor(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) with ``steps_per_epoch`` steps/epoch."""
    epoch = step / steps_per_epoch
    warmup = recipe.warmup_epochs
    if warmup > 0 and epoch < warmup:  # linear up to 1, never past it (warmup * steps may be fractional)
        return min(1.0, (step + 1) / (warmup * steps_per_epoch))
    if recipe.schedule == "constant":
        return 1.0
    if recipe.schedule == "step":
        return recipe.gamma ** (step // steps_per_epoch // recipe.step_size)
    total = max(recipe.epochs - warmup, 1e-12)
    progress = min((epoch - warmup) / total, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cosine


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """Parameter groups: with ``decay_norm_and_bias=False``, 1-D parameters (BN, biases) get no decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.decay_norm_and_bias:
        return [{"params": params, "weight_decay": recipe.weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov) or AdamW over ``model``'s trainable parameters."""
    groups = param_groups(model, recipe)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.momentum, 0.999))


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler following :func:`lr_factor` (call ``step()`` after every optimizer step).

    The factor is a closure, so the scheduler's state dict holds only the step count: resuming with a
    changed recipe (e.g. more epochs) follows the new recipe from the saved step on.
    """
    if steps_per_epoch < 1:
        raise RecipeError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def factor(step: int) -> float:
        return lr_factor(recipe, step, steps_per_epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device`` (None: AMP off): bf16 on CPU; on CUDA bf16 where supported,
    else fp16 (``amp_dtype`` forces one)."""
    if not recipe.amp:
        return None
    if recipe.amp_dtype == "bf16":
        return torch.bfloat16
    if recipe.amp_dtype == "fp16":
        if device.type == "cpu":
            raise RecipeError("recipe field amp_dtype (--amp-dtype) fp16 is not supported on the CPU; use bf16")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def recipe_fields() -> Iterable[tuple[str, type, object]]:
    """(name, type, default) of every recipe field, for building CLI flags."""
    hints: dict[str, Callable] = {"int": int, "float": float, "str": str, "bool": bool}
    for f in dataclasses.fields(Recipe):
        yield f.name, hints[f.type if isinstance(f.type, str) else f.type.__name__], f.default
