"""``cspmirror info``: the model family with parameters and GMACs, the devices and the backends."""

from __future__ import annotations

import argparse
import platform

import torch

from .. import backends
from ..models import get_model, list_models
from ..profile import count_gmacs, count_params
from ..train.cli_args import int_at_least, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolution", type=positive_int, default=256, help="input size for GMACs (default 256)")
    parser.add_argument("--models", nargs="*", choices=list_models(), default=None, metavar="MODEL",
                        help=f"model names (default: all): {', '.join(list_models())}")
    parser.add_argument("--num-classes", type=int_at_least(0), default=1000, help="classifier outputs (0: none)")


def run(args: argparse.Namespace) -> int:
    print(f"cspmirror on {platform.python_implementation()} {platform.python_version()}, "
          f"torch {torch.__version__}")
    print("\nDevices:")
    print("  cpu")
    for i in range(torch.cuda.device_count()):
        print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
    print("\nBackends:")
    for status in backends.all_statuses():
        print(f"  {status}")
    print(f"\nModels (GMACs at {args.resolution}x{args.resolution}, batch 1):")
    print(f"  {'name':<20} {'params (M)':>11} {'GMACs':>8}")
    for name in args.models or list_models():
        model = get_model(name, num_classes=args.num_classes)
        print(f"  {name:<20} {count_params(model) / 1e6:>11.2f} {count_gmacs(model, args.resolution):>8.2f}")
    return 0
