"""Synchronised BatchNorm + Mish for multi-process training (DistributedDataParallel).

:class:`SyncBatchNormMish2d` normalises with statistics over the batches of *all* processes of a group, as
:class:`torch.nn.SyncBatchNorm` does, so a run on W processes with B/W samples each computes what one
process computes on B samples. The math is written with torch ops and ``torch.distributed`` collectives;
no fused kernel is involved (the sync, not the arithmetic, is the cost here).

Forward (training, in a process group of size > 1): each process computes per-channel (count, mean,
M2 = sum of squared deviations) in fp32 (fp64 for fp64 inputs); one ``all_gather`` brings every process's
triple, which are combined exactly (Chan et al.'s parallel variance, the same combination as
``batch_norm_gather_stats_with_counts``); the input is normalised with the global mean and biased
variance, scaled, shifted, then Mish (+ residual). Running statistics take the global mean and the
unbiased global variance, as ``nn.BatchNorm2d``.

Backward: with ``xhat = (x - mean) * rstd``, the local per-channel sums ``sum(dy)`` and ``sum(dy * xhat)``
are all-reduced (summed) over the group, then
``dx = weight * rstd * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N)`` with ``N`` the global count.
The weight and bias gradients stay local (``sum(dy * xhat)``, ``sum(dy)``): DistributedDataParallel
averages them with every other parameter gradient, exactly as for ``torch.nn.SyncBatchNorm``.

Outside a process group (or with one process, or in eval mode) the module is a plain
:class:`~cspmirror.layers.BatchNormMish2d`, fused ops and ``backend`` included.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .layers import BatchNormMish2d

_DIMS = (0, 2, 3)


def _group_size(group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype: fp32 for half types, else unchanged (fp32 / fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _local_moments(xf: torch.Tensor) -> torch.Tensor:
    """[count, mean (C), M2 (C)] of ``xf`` (fp32 or fp64) [N, C, H, W] as one vector of 2C + 1 elements."""
    channels = xf.shape[1]
    count = xf.numel() // channels
    if count == 0:
        zeros = xf.new_zeros(channels)
        return torch.cat([xf.new_zeros(1), zeros, zeros])
    var, mean = torch.var_mean(xf, dim=_DIMS, correction=0)
    return torch.cat([xf.new_full((1,), float(count)), mean, var * count])


def combine_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine per-process rows [W, 2C + 1] of (count, mean, M2) into global (count, mean, biased var)."""
    channels = (moments.shape[1] - 1) // 2
    counts = moments[:, :1]
    means, m2 = moments[:, 1:1 + channels], moments[:, 1 + channels:]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    m2_total = (m2 + counts * (means - mean) ** 2).sum(0)
    return total, mean, m2_total / total


class _SyncBatchNorm(torch.autograd.Function):
    """``y = (x - mean) * rstd * weight + bias`` with mean / var over the whole process group."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, world_size):
        xf = _acc(x)
        local = _local_moments(xf)
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)
        count, mean, var = combine_moments(torch.stack(gathered))
        # as nn.BatchNorm2d (else the unbiased running_var is 0/0); the group's count is read (a host sync) only
        # when this process alone holds too few values to tell
        if x.numel() <= x.shape[1] and count.item() <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count.item())} "
                             f"over the process group (input size {tuple(x.shape)} here)")
        rstd = torch.rsqrt(var + eps)
        scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
        shift = -mean * scale if bias is None else bias.to(rstd.dtype) - mean * scale
        y = xf * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        ctx.save_for_backward(x, weight, mean, rstd, count)
        ctx.group = group
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var, count)
        return y.to(x.dtype), mean, var, count

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_count):
        x, weight, mean, rstd, count = ctx.saved_tensors
        dy = _acc(grad_y)
        xhat = (_acc(x) - mean.view(1, -1, 1, 1)) * rstd.view(1, -1, 1, 1)
        sum_dy = dy.sum(_DIMS)
        sum_dy_xhat = (dy * xhat).sum(_DIMS)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            g_dy, g_dy_xhat = (sums / count).chunk(2)
            scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
            grad_x = (dy - g_dy.view(1, -1, 1, 1) - xhat * g_dy_xhat.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
            grad_x = grad_x.to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = sum_dy_xhat.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = sum_dy if weight is None else sum_dy.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None


class SyncBatchNormMish2d(BatchNormMish2d):
    """:class:`~cspmirror.layers.BatchNormMish2d` whose training statistics span a process group.

    Same parameters, buffers and state-dict keys as ``BatchNormMish2d`` / ``nn.BatchNorm2d``.
    ``forward(x, residual=None, out=None)``: [N, C, H, W] -> ``mish(bn(x)) (+ residual)``, into ``out`` if
    given. See the module docstring for the forward and backward math.

    Args:
        process_group: the group to synchronise over (None: the default group).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: dist.ProcessGroup | None = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        world = _group_size(self.process_group)
        if not self.training or world <= 1:
            return super().forward(x, residual, out)
        self._check_input_dim(x)
        factor = self._step_factor()
        y, mean, var, count = _SyncBatchNorm.apply(x, self.weight, self.bias, self.eps, self.process_group,
                                                   world)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * (count / (count - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        z = F.mish(y)
        if residual is not None:
            z = z + residual
        if out is None:
            return z
        out.copy_(z)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + ", sync=True"


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every :class:`BatchNormMish2d` in ``module`` by a :class:`SyncBatchNormMish2d`.

    The new modules share the old ones' parameters and buffers (state-dict keys unchanged) and keep their
    ``backend`` and training mode. Plain ``nn.BatchNorm2d`` layers are left alone (use
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for those, *after* this function). Returns the
    converted module (``module`` itself unless it is a BatchNormMish2d).
    """
    converted = module
    if isinstance(module, BatchNormMish2d) and not isinstance(module, SyncBatchNormMish2d):
        converted = SyncBatchNormMish2d(module.num_features, module.eps, module.momentum, module.affine,
                                        module.track_running_stats, process_group)
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        converted.backend = module.backend
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted
