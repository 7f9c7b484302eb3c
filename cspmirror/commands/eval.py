"""``cspmirror eval``: top-1 / top-5 accuracy and loss of a training checkpoint on a dataset split.

The model (family member and knobs), the number of classes and the input normalisation come from the
checkpoint; the data flags say where the images are.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import backends
from ..devices import parse_device
from ..fuse import fuse_for_inference
from ..train import cli_args
from ..train.checkpointing import check_classes, data_for_checkpoint, load_checkpoint_dict, model_from_checkpoint
from ..train.data import build_eval_dataset, stats_tensors
from ..train.distributed import DistContext
from ..train.engine import StepEnv, evaluate, make_loader


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by cspmirror train "
                                                            "(file, or run folder for its last.pt)")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit-batches", type=cli_args.positive_int, default=None,
                        help="evaluate only this many batches")
    parser.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, bf16/fp16 on CUDA)")
    parser.add_argument("--fuse", action="store_true", help="fold BatchNorm into the convolutions first")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON here")
    cli_args.add_data_arguments(parser, workers=0)
    cli_args.add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        state = load_checkpoint_dict(args.checkpoint)
        device = parse_device(args.device)
        backends.resolve(args.backend, device)  # BackendUnavailableError before evaluating
        backends.ensure_loaded(args.backend)
        dataset, classes = build_eval_dataset(data_for_checkpoint(cli_args.data_config(args), state), args.split)
        check_classes(state, classes)
        model = model_from_checkpoint(state, device, args.backend)
        if args.json:  # before evaluating, not after
            if Path(args.json).is_dir():
                raise ValueError(f"--json {args.json}: is a folder; give a file path")
            try:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"--json {args.json}: cannot create its folder ({exc})") from None
    except cli_args.CONFIG_ERRORS as exc:  # DataNotFoundError is a FileNotFoundError
        return cli_args.fail("eval", exc)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.fuse:
        fuse_for_inference(model)
    amp_dtype = (torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
                 ) if args.amp else None
    mean, std = stats_tensors(tuple(state["mean"]), tuple(state["std"]), device)
    env = StepEnv(device, mean, std, amp_dtype, args.channels_last, DistContext(), args.progress)
    loader = make_loader(dataset, args.batch_size, env.ctx, train=False, seed=0, workers=args.workers,
                         device=device)
    metrics = evaluate(model, loader, env, args.limit_batches, desc=f"eval {args.split}")
    top5 = "top-5" if len(classes) >= 5 else f"top-5 (= all {len(classes)} classes)"
    print(f"{state['model_name']} (epoch {state.get('epoch', '?')}) on {metrics['count']} {args.split} images: "
          f"top-1 {metrics['top1']:.2f}%  {top5} {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": str(args.checkpoint), "split": args.split, **metrics}, f, indent=2)
            f.write("\n")
    return 0
