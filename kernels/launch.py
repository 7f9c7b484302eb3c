"""Host-side helpers shared by the launchers.

The integer helpers are plain Python on purpose: in recent Triton ``triton.cdiv`` and
``triton.next_power_of_2`` are ``@triton.jit`` functions, and each call from Python costs microseconds, which
add up in the per-call cost of small ops.
"""

import contextlib

import torch


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(0, n - 1).bit_length()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device``: Triton launches on the current CUDA device, not on its tensors' (a no-op when
    ``device`` is already current, or not a CUDA device)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
