"""The training loop: :func:`fit` runs a whole run (one process or DistributedDataParallel), built from
:func:`train_one_epoch` and :func:`evaluate`.

Reproducibility: the model is initialised from ``seed``; every epoch re-seeds Python, NumPy and torch from
``(seed, epoch, rank)`` and shuffles with a DistributedSampler seeded by ``(seed, epoch)``. So a run
resumed from the checkpoint of epoch k continues exactly as the uninterrupted run would have (bit-exact on
the CPU; on GPUs up to the non-determinism of cuDNN/atomics), and the order of samples does not depend on
the number of processes: W processes with ``batch_size / W`` samples each see, step by step, the same
global batches as one process, when W divides the training set. When it does not, DistributedSampler pads
the epoch with the first samples of its order again (as in timm): the last global batch then holds those
repeats, and they count in the training loss and accuracy (validation counts every image once).

:func:`fit` is :func:`prepare` (everything that can fail on the configuration: data, device, backend, recipe,
resume checkpoint) followed by :meth:`PreparedRun.train` (the epochs).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .. import backends
from ..fuse import set_backend
from ..models import MODEL_CONFIGS, CSPMirrorNetConfig, configure, get_model
from ..profile import count_params
from ..progress import progress_bar
from ..sync_bn import convert_sync_batchnorm
from . import distributed
from .checkpointing import (
    BEST,
    LAST,
    RESUME_KEYS,
    check_classes,
    data_for_checkpoint,
    load_checkpoint_dict,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from .data import DataConfig, build_datasets, resolve_format, stats_tensors, to_input
from .distributed import DistContext
from .history import COLUMNS, write_csv
from .plots import matplotlib_available, note_no_matplotlib, plot_history
from .recipes import (
    RECIPES,
    Recipe,
    RecipeError,
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    check_warmup_ends,
    get_recipe,
)

METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
CONFIG_JSON = "config.json"
# What a run writes in its folder: a folder holding any of them holds a run (a new one goes elsewhere).
RUN_FILES = (LAST, BEST, METRICS_CSV, CURVES_PNG, CONFIG_JSON)


DEFAULT_MODEL = "cspmirrornet_tiny"
DEFAULT_RECIPE = "paper"


def check_output_folder(path: str | os.PathLike, flag: str) -> None:
    """Create the folder ``path`` (ValueError naming ``flag`` when it cannot be), so that a wrong output
    folder fails before the first step rather than after it."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {str(path)!r}: cannot create the folder ({exc.strerror or exc})") from None


@dataclass
class TrainConfig:
    """One training run. ``recipe`` names a preset of :data:`~cspmirror.train.recipes.RECIPES`;
    ``recipe_overrides`` replace its fields (``None`` values ignored; the preset's warm-up is fitted to a short
    run unless ``warmup_epochs`` is given: :func:`~cspmirror.train.recipes.get_recipe`).

    ``model`` and ``recipe`` None mean :data:`DEFAULT_MODEL` and :data:`DEFAULT_RECIPE`. When ``resume`` is set
    (a checkpoint file or a run folder), the model name and knobs and the recipe come from the checkpoint, and a
    ``model``, knob or ``recipe`` given must agree with it (it could not take effect); ``recipe_overrides``
    still apply (e.g. more ``epochs``), and the image size is the checkpoint's unless ``data.image_size`` is set.
    """

    output: str
    data: DataConfig = field(default_factory=DataConfig)
    model: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    recipe: str | None = None
    recipe_overrides: dict = field(default_factory=dict)
    device: str = "auto"
    backend: str = "auto"
    channels_last: bool = False
    grad_checkpointing: bool = False  # recompute each stage in the backward (less memory, more time)
    seed: int | None = None  # None: the resumed checkpoint's seed, else 0
    resume: str | None = None
    max_steps_per_epoch: int | None = None
    max_val_batches: int | None = None
    sync_bn: bool = True
    progress: bool = True
    verbose: bool = True

    def __post_init__(self) -> None:
        for name, flag in (("max_steps_per_epoch", "--max-steps-per-epoch"),
                           ("max_val_batches", "--limit-val-batches")):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} ({flag}) must be >= 1, got {value}")
        if self.seed is not None and not 0 <= self.seed < 2**63:  # seed + epoch seeds a torch.Generator (< 2**64)
            raise ValueError(f"seed (--seed) must be >= 0 and < 2**63, got {self.seed}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise RecipeError(f"recipe (--recipe) must be one of {sorted(RECIPES)}, got {self.recipe!r}")


@dataclass
class FitResult:
    history: list[dict]
    output: Path
    checkpoint: Path
    num_params: int
    model: str
    model_kwargs: dict
    recipe: Recipe


# ------------------------------------------------------------------------------------------ small helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A well-mixed 32-bit seed for (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + W, rank + 2W, ...``: every sample exactly once over all processes (no padding,
    unlike DistributedSampler), for evaluation whose sums are all-reduced."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def make_loader(dataset: Dataset, batch_size: int, ctx: DistContext, *, train: bool, seed: int,
                workers: int, device: torch.device) -> DataLoader:
    """Train: shuffled DistributedSampler (seeded; call ``sampler.set_epoch``). Eval: :class:`ShardSampler`.

    ``batch_size`` is per process. The training loader drops the last batch of an epoch when it would hold a
    single sample (per process), and only then: BatchNorm cannot train on one value per channel (a 1x1 last
    stage). Every process drops it, since DistributedSampler gives each the same number of samples.
    """
    if train:
        sampler: Sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                              shuffle=True, seed=seed, drop_last=False)
        drop_last = batch_size > 1 and len(sampler) % batch_size == 1
    else:
        sampler = ShardSampler(len(dataset), ctx.rank, ctx.world_size)
        drop_last = False
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator(), drop_last=drop_last)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# ------------------------------------------------------------------------------------------ epoch / eval


@dataclass
class StepEnv:
    """What a training or evaluation pass needs besides the model and the data."""

    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    ctx: DistContext = field(default_factory=DistContext)
    progress: bool = True


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    criterion: nn.Module, env: StepEnv, steps: int, grad_clip: float = 0.0,
                    desc: str = "train") -> dict[str, float]:
    """``steps`` optimizer steps (scheduler stepped after each); returns mean ``loss`` and ``acc`` (%)
    over all samples of all processes."""
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss * n, correct, n
    bar = progress_bar(itertools.islice(loader, steps), desc, enabled=env.progress and env.ctx.is_main, total=steps,
                       leave=False)
    for i, (images, targets) in enumerate(bar):
        x = to_input(images, env.mean, env.std, env.channels_last)
        y = targets.to(env.device, non_blocking=True)
        with _autocast(env.device, env.amp_dtype):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = y.numel()
        sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(n), dtype=torch.float64, device=env.device)])
        if not bar.disable and i % 10 == 0:
            bar.set_postfix(loss=f"{sums[0].item() / sums[2].item():.4f}")
    distributed.all_reduce_sum(sums, env.ctx)
    total = max(sums[2].item(), 1.0)
    return {"loss": sums[0].item() / total, "acc": 100.0 * sums[1].item() / total}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: StepEnv, max_batches: int | None = None,
             desc: str = "eval") -> dict[str, float]:
    """Mean cross-entropy ``loss``, ``top1`` and ``top5`` accuracy (%) and ``count`` of the samples seen
    (all processes). Top-5 is top-min(5, classes)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, top1, top5, n
    total_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    bar = progress_bar(itertools.islice(loader, total_batches), desc, enabled=env.progress and env.ctx.is_main,
                       total=total_batches, leave=False)
    for images, targets in bar:
        x = to_input(images, env.mean, env.std, env.channels_last)
        y = targets.to(env.device, non_blocking=True)
        with _autocast(env.device, env.amp_dtype):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(1).sum().double(),
                             torch.tensor(float(y.numel()), dtype=torch.float64, device=env.device)])
    distributed.all_reduce_sum(sums, env.ctx)
    n = sums[3].item()
    if n == 0:
        return {"loss": math.nan, "top1": math.nan, "top5": math.nan, "count": 0}
    return {"loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n,
            "count": int(n)}


# --------------------------------------------------------------------------------------------------- fit


def fit(cfg: TrainConfig) -> FitResult:
    """Train as configured; under ``torchrun`` (WORLD_SIZE > 1) with DistributedDataParallel.

    Rank 0 writes, in ``cfg.output``: ``last.pt`` every epoch (and ``best.pt``), ``metrics.csv``,
    ``curves.png`` (when matplotlib is installed) and ``config.json``. Raises
    :class:`~cspmirror.train.data.DataNotFoundError` when the data is missing. Same as
    ``prepare(cfg).train()``.
    """
    return prepare(cfg).train()


def prepare(cfg: TrainConfig) -> PreparedRun:
    """Join the process group (if any) and build everything a run needs, checking the configuration: the
    data, the device, the backend, the recipe and the resume checkpoint. Nothing is trained or written yet (but
    the output folder is created); the errors a wrong configuration gives (ValueError, FileNotFoundError,
    RecipeError, :class:`~cspmirror.backends.BackendUnavailableError`) come from here, not from
    :meth:`PreparedRun.train`.
    """
    ctx, device = distributed.setup(cfg.device)
    with distributed.leaving(ctx, on_success=False):
        return _prepare(cfg, ctx, device)


def _resolved_seed(cfg: TrainConfig, ckpt: dict | None) -> int:
    """``cfg.seed``; when not given, the seed the resumed run was started with (else 0), so that a resumed
    run continues as the uninterrupted one would have."""
    if cfg.seed is not None:
        return cfg.seed
    saved = ckpt.get("args", {}).get("seed") if ckpt else None
    return int(saved) if isinstance(saved, int) else 0


@dataclass
class PreparedRun:
    """A run built by :func:`prepare`; :meth:`train` runs its epochs."""

    cfg: TrainConfig
    ctx: DistContext
    device: torch.device
    recipe: Recipe
    model_name: str
    model_kwargs: dict
    model: nn.Module  # the plain model (evaluated and saved)
    train_model: nn.Module  # the model, or its DDP wrapper
    train_loader: DataLoader
    val_loader: DataLoader
    steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    env: StepEnv
    meta: dict
    n_params: int
    num_train: int
    num_val: int
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: float = -math.inf
    carry_best: Path | None = None  # resumed into another folder: the checkpoint of the best epoch so far
    carry_note: str = ""  # ... or why there is none to carry

    def train(self) -> FitResult:
        """Run the epochs (see :func:`fit`), then leave the process group if :func:`prepare` joined it."""
        with distributed.leaving(self.ctx):
            return self._train()

    def _train(self) -> FitResult:
        cfg, ctx, recipe, model, optimizer = self.cfg, self.ctx, self.recipe, self.model, self.optimizer
        history, best, steps = self.history, self.best, self.steps
        out = Path(cfg.output)
        log = print if (ctx.is_main and cfg.verbose) else (lambda *a, **k: None)
        plots = matplotlib_available()
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / CONFIG_JSON).write_text(json.dumps({**self.meta, "world_size": ctx.world_size,
                                                       "device": str(self.device)}, indent=2) + "\n")
            if not plots and cfg.verbose:
                note_no_matplotlib()
            if self.carry_best is not None:  # the new folder's best.pt, until a resumed epoch beats it
                shutil.copyfile(self.carry_best, out / BEST)
        log(f"{self.model_name} ({self.n_params / 1e6:.2f}M params) on {self.device} x{ctx.world_size}, "
            f"{self.num_train} train / {self.num_val} val images, {steps} steps/epoch, "
            f"epochs {self.start_epoch + 1}..{recipe.epochs}, warm-up {recipe.warmup_epochs:g} epochs, "
            f"amp={self.env.amp_dtype}")
        log(f"run folder: {out}")
        if self.carry_note:
            log(self.carry_note)

        for epoch in range(self.start_epoch, recipe.epochs):
            t0 = time.perf_counter()
            seed_everything(epoch_seed(cfg.seed, epoch, ctx.rank))
            self.train_loader.sampler.set_epoch(epoch)
            self.train_loader.generator.manual_seed(epoch_seed(cfg.seed, epoch, ctx.rank))
            lr = optimizer.param_groups[0]["lr"]
            tag = f"epoch {epoch + 1}/{recipe.epochs}"
            tr = train_one_epoch(self.train_model, self.train_loader, optimizer, self.scheduler, self.scaler,
                                 self.criterion, self.env, steps, recipe.grad_clip, desc=tag)
            # Each process updated its own BatchNorm running statistics (they differ without SyncBN): evaluate
            # rank 0's, the ones the checkpoint saves.
            distributed.broadcast_buffers(model, ctx)
            va = evaluate(model, self.val_loader, self.env, cfg.max_val_batches, desc=f"{tag} val")
            row = dict(epoch=epoch + 1, train_loss=tr["loss"], train_acc=tr["acc"], val_loss=va["loss"],
                       val_acc=va["top1"], val_top5=va["top5"], lr=lr, time=time.perf_counter() - t0)
            history.append(row)
            improved = row["val_acc"] > best
            best = max(best, row["val_acc"])
            if ctx.is_main:
                state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                             scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                             epoch=epoch + 1, history=history, best_val_acc=best, **self.meta)
                save_checkpoint(state, out / LAST)
                if improved:
                    shutil.copyfile(out / LAST, out / BEST)
                write_csv(history, out / METRICS_CSV, COLUMNS)
                if plots:
                    plot_history(history, out / CURVES_PNG, title=f"{self.model_name}: training and validation")
            log(f"{tag}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}%  "
                f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2f}% top5 {row['val_top5']:.2f}%  "
                f"lr {lr:.4g}  {row['time']:.1f}s")
        self.best = best
        return FitResult(history, out, out / LAST, self.n_params, self.model_name, self.model_kwargs, recipe)


def _prepare(cfg: TrainConfig, ctx: DistContext, device: torch.device) -> PreparedRun:
    ckpt = load_checkpoint_dict(cfg.resume, RESUME_KEYS) if cfg.resume else None
    cfg = dataclasses.replace(cfg, seed=_resolved_seed(cfg, ckpt))
    if ckpt:
        _check_resume_agrees(cfg, ckpt)
        _check_output_holds_no_later_epochs(cfg, ckpt)
    if ckpt:
        recipe = _resumed_recipe(cfg, ckpt)
    else:
        recipe = get_recipe(cfg.recipe or DEFAULT_RECIPE, **cfg.recipe_overrides)
    check_warmup_ends(recipe)
    if ckpt and int(ckpt["epoch"]) >= recipe.epochs:  # else it would train nothing and say nothing
        raise RecipeError(f"epochs (--epochs) {recipe.epochs}: the checkpoint resumed has done {ckpt['epoch']} "
                          f"epochs already; give more --epochs to train on")
    model_name = ckpt["model_name"] if ckpt else cfg.model or DEFAULT_MODEL
    model_kwargs = dict(ckpt["model_kwargs"]) if ckpt else dict(cfg.model_kwargs)
    if recipe.batch_size % ctx.world_size:
        raise RecipeError(f"batch_size (--batch-size) {recipe.batch_size} is the global batch and must be "
                          f"divisible by the number of processes ({ctx.world_size})")
    amp_dtype = autocast_dtype(recipe, device)
    backends.resolve(cfg.backend, device)  # BackendUnavailableError now, not at the first step
    backends.ensure_loaded(cfg.backend)  # an extension that fails to build, too
    data_cfg = data_for_checkpoint(cfg.data, ckpt) if ckpt else cfg.data  # a resumed run keeps its image size
    cfg = dataclasses.replace(cfg, data=resolve_format(data_cfg))  # the checkpoint keeps the format found
    data = build_datasets(cfg.data, augment=recipe.augment)
    if ckpt:
        check_classes(ckpt, data.classes)
    per_rank = recipe.batch_size // ctx.world_size
    _check_batch_norm_trains(model_name, data.image_size, per_rank, ctx.enabled and cfg.sync_bn)

    seed_everything(cfg.seed)
    model = get_model(model_name, num_classes=data.num_classes, drop_rate=recipe.drop_rate,
                      drop_path_rate=recipe.drop_path_rate, **model_kwargs)
    set_backend(model, cfg.backend)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if ckpt:
        load_weights(model, ckpt)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    if ctx.enabled and cfg.sync_bn:
        model = convert_sync_batchnorm(model)
    train_model = model
    if ctx.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    loader_kw = dict(ctx=ctx, seed=cfg.seed, workers=cfg.data.workers, device=device)
    train_loader = make_loader(data.train, per_rank, train=True, **loader_kw)
    if len(train_loader) == 0:  # one image per process, its batch of one dropped (make_loader)
        raise ValueError(f"the training split has {len(data.train)} image(s): no training step on {ctx.world_size} "
                         f"process(es) (a last batch of one image per process is dropped: BatchNorm)")
    val_loader = make_loader(data.val, per_rank, train=False, **loader_kw)
    steps = len(train_loader) if cfg.max_steps_per_epoch is None else min(len(train_loader),
                                                                           cfg.max_steps_per_epoch)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, history, best = 0, [], -math.inf
    carry_best, carry_note = _carried_best(cfg, ckpt) if ckpt else (None, "")
    if ckpt:
        _restore(ckpt, optimizer, scheduler, scaler, recipe, int(ckpt["epoch"]) * steps)
        start_epoch, history = int(ckpt["epoch"]), list(ckpt.get("history", []))
        best = float(ckpt.get("best_val_acc", -math.inf))

    mean, std = stats_tensors(data.mean, data.std, device)
    env = StepEnv(device, mean, std, amp_dtype, cfg.channels_last, ctx, cfg.progress)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    meta = dict(model_name=model_name, model_kwargs=model_kwargs, num_classes=data.num_classes,
                classes=list(data.classes), mean=list(data.mean), std=list(data.std),
                image_size=data.image_size, recipe=recipe.to_dict(), args=_jsonable(dataclasses.asdict(cfg)))
    if ctx.is_main:  # last: a run that fails an earlier check leaves no empty folder behind
        check_output_folder(cfg.output, "--output")
    return PreparedRun(cfg, ctx, device, recipe, model_name, model_kwargs, model, train_model, train_loader,
                       val_loader, steps, optimizer, scheduler, scaler, criterion, env, meta, count_params(model),
                       len(data.train), len(data.val), start_epoch, history, best, carry_best, carry_note)


def _resumed_recipe(cfg: TrainConfig, ckpt: dict) -> Recipe:
    """A resumed run's recipe: the checkpoint's, with the recipe fields ``cfg`` gives on top."""
    return Recipe(**ckpt["recipe"]).with_overrides(**cfg.recipe_overrides)


def finished_result(cfg: TrainConfig, ckpt: dict) -> FitResult | None:
    """The result of the run ``ckpt`` (``cfg.resume``, loaded) holds when it has trained every epoch of its recipe
    (``cfg``'s recipe fields on top), else None. Whether the checkpoint was trained as ``cfg`` says is the
    caller's check (:func:`~cspmirror.train.ablation.start_ablation` compares every field)."""
    recipe = _resumed_recipe(cfg, ckpt)
    if int(ckpt["epoch"]) < recipe.epochs:
        return None
    model = get_model(ckpt["model_name"], num_classes=int(ckpt["num_classes"]), **ckpt["model_kwargs"])
    return FitResult(list(ckpt.get("history", [])), Path(cfg.output), resolve_checkpoint(cfg.resume),
                     count_params(model), ckpt["model_name"], dict(ckpt["model_kwargs"]), recipe)


def _check_batch_norm_trains(model_name: str, image_size: int, per_rank: int, synced: bool) -> None:
    """RecipeError naming ``--batch-size`` when every training batch would give BatchNorm one value per channel:
    one image per process (its statistics not synchronised with other processes') and a 1x1 last stage."""
    stages, side = len(MODEL_CONFIGS[model_name].stages), image_size
    for _ in range(stages):  # each stage starts with a 3x3 conv of stride 2, padding 1
        side = (side + 1) // 2
    if per_rank == 1 and side == 1 and not synced:
        raise RecipeError(f"batch_size (--batch-size) gives one image per process: BatchNorm cannot train on one "
                          f"value per channel, and the last stage of {model_name} is 1x1 at {image_size}x{image_size} "
                          f"(a batch of at least 2, or an image size above {2 ** stages})")


def _check_output_holds_no_later_epochs(cfg: TrainConfig, ckpt: dict) -> None:
    """ValueError naming ``--output`` when it holds a run further along than the checkpoint resumed (as when
    resuming from ``best.pt`` in its own folder): going on there would overwrite its later epochs."""
    last = Path(cfg.output) / LAST
    if not last.is_file() or last.resolve() == resolve_checkpoint(cfg.resume).resolve():
        return
    try:
        epoch = int(load_checkpoint_dict(last, ("epoch",))["epoch"])
    except ValueError:  # not a training checkpoint: no epochs to lose
        return
    if epoch > int(ckpt["epoch"]):
        raise ValueError(f"--output {cfg.output} holds a run at epoch {epoch}, past the checkpoint resumed (epoch "
                         f"{ckpt['epoch']}): going on there would overwrite its later epochs (last.pt, metrics.csv); "
                         f"give another --output")


def _carried_best(cfg: TrainConfig, ckpt: dict) -> tuple[Path | None, str]:
    """For a run resumed into another folder than its checkpoint's, the checkpoint of its best epoch so far, to
    copy there as ``best.pt`` (else that folder has none unless a resumed epoch beats the best): the checkpoint
    resumed when its last epoch is the best, else the ``best.pt`` beside it when it is this run's at that epoch
    (the same history up to it). When neither is: None and a note saying so. Resumed in place: (None, "")."""
    resumed = resolve_checkpoint(cfg.resume).resolve()
    out = Path(cfg.output).resolve()
    history, best = list(ckpt.get("history", [])), ckpt.get("best_val_acc")
    epoch = next((i + 1 for i, row in enumerate(history) if row.get("val_acc") == best), None)
    if resumed.parent == out or epoch is None:
        return None, ""
    if epoch == int(ckpt["epoch"]):
        return resumed, ""
    sibling = resumed.parent / BEST
    try:
        state = load_checkpoint_dict(sibling, ("epoch", "history")) if sibling.is_file() else None
    except ValueError:  # not a training checkpoint
        state = None
    if state is not None and int(state["epoch"]) == epoch and list(state["history"]) == history[:epoch]:
        return sibling, ""
    return None, (f"note: no checkpoint of the best epoch so far (epoch {epoch}, val top-1 {best:.2f}%) beside "
                  f"{resumed}; {out / BEST} is written when a resumed epoch beats it")


def _check_resume_agrees(cfg: TrainConfig, ckpt: dict) -> None:
    """A resumed run trains the checkpoint's model with the checkpoint's recipe: a ``--model``, knob or
    ``--recipe`` given that would change them is an error (silently ignored, it would look as if it applied)."""
    name, saved = ckpt["model_name"], dict(ckpt["model_kwargs"])
    if cfg.model is not None and cfg.model != name:
        raise ValueError(f"--model {cfg.model}: the checkpoint resumed is a {name}; on --resume the model is the "
                         f"checkpoint's (leave --model out)")

    def architecture(knobs: dict) -> CSPMirrorNetConfig:
        return configure(MODEL_CONFIGS[name], **knobs)

    changed = [k for k, v in cfg.model_kwargs.items() if architecture({**saved, k: v}) != architecture(saved)]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise ValueError(f"{flags}: the checkpoint resumed was trained with {saved or 'the default knobs'}; on "
                         f"--resume the model's knobs are the checkpoint's (leave {flags} out)")
    if cfg.recipe is not None:
        given = RECIPES[cfg.recipe].with_overrides(**cfg.recipe_overrides)
        saved_recipe = _resumed_recipe(cfg, ckpt)
        # A preset's warm-up depends on the run's length (get_recipe), which --epochs may change on resume: unless
        # given, it is the checkpoint's, as the preset fitted it to the run that was started.
        compared = [f.name for f in dataclasses.fields(Recipe)
                    if f.name != "warmup_epochs" or cfg.recipe_overrides.get("warmup_epochs") is not None]
        fields = [name for name in compared if getattr(given, name) != getattr(saved_recipe, name)]
        if fields:
            raise RecipeError(f"--recipe {cfg.recipe}: the checkpoint's recipe differs in {fields}; on --resume the "
                              f"recipe is the checkpoint's, with the recipe fields given as flags on top (leave "
                              f"--recipe out)")


def _restore(ckpt: dict, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
             scaler: torch.amp.GradScaler, recipe: Recipe, step: int) -> None:
    """Load optimizer / scheduler / scaler state, then re-apply the (possibly overridden) recipe's
    hyper-parameters, so that e.g. ``--epochs`` or ``--lr`` given on resume take effect. ``step`` is the
    schedule's position now (completed epochs x steps per epoch of this run: the saved step count means
    another epoch when ``--batch-size`` or ``--max-steps-per-epoch`` changed)."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    was = ckpt.get("recipe", {})
    for name in ("optimizer", "decay_norm_and_bias"):  # the optimizer state's layout depends on these
        if name in was and was[name] != getattr(recipe, name):
            raise RecipeError(f"recipe field {name} (--{name.replace('_', '-')}) cannot change on resume: the "
                              f"checkpoint's optimizer state is for {was[name]!r}, got {getattr(recipe, name)!r}")
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.last_epoch = step
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, hyper in zip(optimizer.param_groups, fresh, strict=True):
        group.update(hyper)
        group["initial_lr"] = recipe.lr
        group["lr"] = recipe.lr * factor
    scheduler.base_lrs = [recipe.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _jsonable(obj: object) -> object:
    """``obj`` with tuples as lists and anything exotic as a string (for JSON and weights_only loads)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
