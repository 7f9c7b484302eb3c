"""What a ``--device`` flag means, for every command line (train, eval, check, bench and its tools).

Every one of them runs kernels on the device, so only ``cpu`` and ``cuda`` devices are accepted (``meta`` is
refused: it holds no data).
"""

from __future__ import annotations

import torch


def parse_device(value: str | None, local_rank: int = 0) -> torch.device:
    """The device a ``--device`` value names, or ValueError naming the flag.

    None or ``"auto"``: CUDA when present, else the CPU. A CUDA device without an index is device
    ``local_rank`` (this process's ``LOCAL_RANK`` under torchrun). Refused: other strings and device types,
    CUDA without a CUDA device, and an index that is not one of this machine's CUDA devices.
    """
    name = value if value is not None else "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"argument --device: expected auto, cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"argument --device: {value!r} asked for CUDA, but no CUDA device is available")
    index = local_rank if device.index is None else device.index
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        which = f"CUDA device {index}" if device.index is not None else f"LOCAL_RANK {index}'s CUDA device"
        raise ValueError(f"argument --device: {value!r} asked for {which}, but this machine has {count} "
                         f"(cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", index)
