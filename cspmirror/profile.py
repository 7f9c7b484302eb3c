"""Parameter and MAC counts of models, without running real arithmetic (tensors on the meta device)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, resolution: int | tuple[int, int] = 256, in_chans: int = 3) -> float:
    """Multiply-accumulates (in 1e9) of one forward pass at batch 1, counted on a meta-device copy."""
    import copy

    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    meta = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(1, in_chans, h, w, device="meta"))
    return counter.get_total_flops() / 2 / 1e9
