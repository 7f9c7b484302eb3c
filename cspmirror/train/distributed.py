"""Process-group setup for ``torchrun`` (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK).

One process per device: NCCL on CUDA devices, gloo on CPUs. Without those variables (or with WORLD_SIZE=1)
everything here is a no-op and training runs in one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..devices import parse_device


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this context initialised the process group (and tears it down)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group described by the environment (if any) and pick this process's device.

    Reuses a process group that is already initialised (e.g. by a test harness).
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = parse_device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(rank, world, local, owns_group=False), dev
    world = env_world_size()
    if world <= 1:
        return DistContext(), parse_device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = parse_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local, owns_group=True), dev


def teardown(ctx: DistContext, clean: bool = True) -> None:
    """Leave the process group if :func:`setup` created it: after a barrier when ``clean`` (every process
    got here), at once when not (an error, which the other processes may never reach)."""
    if ctx.owns_group and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def leaving(ctx: DistContext, *, on_success: bool = True) -> Iterator[None]:
    """Leave the process group :func:`setup` joined for ``ctx`` when the block ends: at once if it raises (the
    other processes may never get as far); after a barrier if it finishes, unless ``on_success`` is False
    (the group then stays for what comes next)."""
    try:
        yield
    except BaseException:
        teardown(ctx, clean=False)
        raise
    if on_success:
        teardown(ctx)


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``values`` over all processes (in place; identity with one process)."""
    if ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every process (no-op with one process).

    Without synchronised BatchNorm each process keeps its own running statistics; before validation this
    makes every process evaluate the model that rank 0 saves.
    """
    if ctx.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)
