"""``cspmirror train``: train a family member on CIFAR-10, an ImageFolder tree or synthetic data.

Multi-GPU / multi-machine: ``torchrun --nproc-per-node 2 $(which cspmirror) train ...`` runs under
DistributedDataParallel (NCCL on GPUs, gloo on CPUs) with synchronised BatchNorm; ``--batch-size`` is the
global batch. Only rank 0 prints progress and results and writes checkpoints, metrics and plots; a configuration
error is printed by each process that meets it, tagged with its rank (one rank alone may meet it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..train import cli_args
from ..train.engine import RUN_FILES, TrainConfig, prepare

DEFAULT_OUTPUT = "runs/train"


def _run_folder(checkpoint: str) -> Path:
    """The run folder of ``--resume``'s value: the folder itself, or the folder holding the file."""
    path = Path(checkpoint)
    return path if path.is_dir() or not path.suffix else path.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_args.add_data_arguments(parser)
    cli_args.add_model_arguments(parser)
    cli_args.add_recipe_arguments(parser)
    cli_args.add_runtime_arguments(parser)
    g = parser.add_argument_group("run")
    g.add_argument("--output", default=None,
                   help=f"folder for checkpoints, metrics.csv, curves.png (default: {DEFAULT_OUTPUT}, or the "
                        "folder of the checkpoint given to --resume); a new run, or one resumed into another "
                        "folder than its own, never overwrites another: when the folder holds one, it goes to "
                        "OUTPUT2, OUTPUT3, ... (see --exist-ok)")
    cli_args.add_exist_ok_argument(g)
    g.add_argument("--seed", type=int, default=None,
                   help="seed of initialisation, shuffling and augmentation (default 0; on --resume, the "
                        "checkpoint's)")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint (file or run folder; no value: OUTPUT/last.pt) with its model, "
                        "knobs, recipe, seed and image size; recipe flags (e.g. --epochs) apply on top")
    g.add_argument("--max-steps-per-epoch", "--limit-train-batches", dest="max_steps_per_epoch", type=int,
                   default=None, help="cap optimizer steps per epoch (smoke runs)")
    g.add_argument("--limit-val-batches", dest="max_val_batches", type=int, default=None,
                   help="cap validation batches per epoch (smoke runs)")
    g.add_argument("--no-sync-bn", dest="sync_bn", action="store_false",
                   help="under DDP, keep per-process BatchNorm statistics")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each stage in the backward instead of keeping its activations")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    resume, output = args.resume, args.output
    if output is None:  # a resumed run goes on in its own folder
        output = str(_run_folder(resume)) if resume else DEFAULT_OUTPUT
    # A run resumed in its own folder goes on there (the run checks that it loses no later epoch); a new run, or one
    # resumed into another folder, never overwrites the run that folder may hold.
    if resume is None or (resume and Path(output).resolve() != _run_folder(resume).resolve()):
        output = cli_args.new_run_folder(output, RUN_FILES, args.exist_ok)
    if resume == "":
        resume = output
    return TrainConfig(
        output=output, data=cli_args.data_config(args), model=args.model,
        model_kwargs=cli_args.model_knobs(args), recipe=args.recipe,
        recipe_overrides=cli_args.recipe_overrides(args), device=args.device, backend=args.backend,
        channels_last=args.channels_last, grad_checkpointing=args.grad_checkpointing, seed=args.seed,
        resume=resume,
        max_steps_per_epoch=args.max_steps_per_epoch, max_val_batches=args.max_val_batches,
        sync_bn=args.sync_bn, progress=args.progress,
    )


def run(args: argparse.Namespace) -> int:
    try:  # everything a wrong flag, data folder or checkpoint can break is checked before the first step
        prepared = prepare(config_from_args(args))
    except cli_args.CONFIG_ERRORS as exc:  # the messages name the flag or the file
        return cli_args.fail("train", exc)
    prepared.train()
    return 0
