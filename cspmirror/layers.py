"""The building blocks of CSPMirrorNet (SPEC §1.3, §1.4), composed from :mod:`cspmirror.ops`.

Every module that calls a fused op keeps a ``backend`` attribute ("auto" by default);
:func:`cspmirror.set_backend` switches all of them. State-dict keys never depend on the backend.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

from . import ops
from .ops import _validate, recompute, reference


class BackendMixin:
    """Holds the ``backend`` string that the module passes to the ops it calls."""

    backend: str = "auto"


class PreloadOnMove:
    """Mixin for the fused-op modules with parameters (put it before ``nn.Module`` among the bases): after
    ``nn.Module._apply`` (``to``, ``cuda``, ``half``, ...) and after unpickling (``torch.load`` of a whole model,
    ``copy.deepcopy``), :func:`cspmirror.accelerate.preload` loads every fused op's implementation for the
    module's backend and the device it is now on (the parameter-free mirror modules cannot tell their device;
    their ops are loaded with the others). A model moved to a GPU, or loaded in a new process, and then compiled
    with ``fullgraph=True`` meets no import (which Dynamo cannot trace) at its first call."""

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        _preload(self)
        return result

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _preload(self)


def _preload(module: nn.Module) -> None:
    from .accelerate import preload  # (accelerate imports this module)

    preload(module)


def _recomputing() -> bool:
    """Whether this forward runs inside autograd's backward on this thread: a recomputation, as by
    ``torch.utils.checkpoint`` (never under ``torch.compile``, whose backward graphs do not run modules)."""
    if torch.compiler.is_compiling():
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)  # private; present since torch 2.0
    return task_id is not None and task_id() != -1


class BatchNormMish2d(PreloadOnMove, nn.BatchNorm2d, BackendMixin):
    """Drop-in for ``Sequential(BatchNorm2d(c), Mish())`` with BatchNorm2d's parameters and buffers.

    ``forward(x, residual=None, out=None)`` returns ``mish(bn(x)) (+ residual)`` [N, C, H, W], written into
    ``out`` when given. Running statistics update exactly as :class:`torch.nn.BatchNorm2d`'s, with one
    exception: a forward that autograd runs again during a backward (``torch.utils.checkpoint``'s
    recomputation) leaves them and ``num_batches_tracked`` as they are, where ``nn.BatchNorm2d`` would count
    the step twice.
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(x)
        factor = self._step_factor() if self.training else 0.0
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return ops.bn_mish(
            x, self.weight, self.bias,
            self.running_mean if track else None, self.running_var if track else None,
            use_batch_stats, factor, self.eps, residual, out=out, backend=self.backend,
        )

    def _step_factor(self) -> float:
        """A training step's exponential-average factor for the running statistics, the step counted in
        ``num_batches_tracked`` (``nn.BatchNorm2d``'s rule), or 0 in a recomputation: the same update calls as
        the first time (autograd checks that the same tensors are saved) leave the running statistics as they
        are (``1 * running + 0 * statistic``), and the step is not counted again."""
        if _recomputing():
            return 0.0
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum


class ConvBNMish(PreloadOnMove, nn.Module, BackendMixin):
    """``conv(bias=False) -> BN -> Mish`` ("CBM"), with an optional residual added after Mish.

    Input [N, c_in, H, W] -> output [N, c_out, H / stride, W / stride]. After :meth:`fuse` (inference),
    BN is folded into ``conv`` (which gains a bias), ``bn`` becomes ``Identity`` and the forward runs
    :func:`cspmirror.ops.conv_bn_mish`.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, stride: int = 1,
                 recompute_input: bool = False):
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size}")
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn: nn.Module = BatchNormMish2d(c_out)
        self.fused = False
        # Training memory: where the input is a fused bn_mish output, let the conv's backward recompute it
        # rather than keep it (cspmirror.ops.recompute; the conv module's own hooks are then bypassed).
        self.recompute_input = recompute_input

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused:
            return ops.conv_bn_mish(x, self.conv.weight, self.conv.bias, self.conv.stride[0], residual,
                                    out=out, backend=self.backend)
        recipe = recompute.input_recipe(x) if self.recompute_input else None
        if recipe is None:
            h = self.conv(x)
        else:
            h = recompute.conv2d_on_recomputed(x, self.conv.weight, self.conv.stride[0], self.conv.padding[0],
                                               recipe)
        return self.bn(h, residual, out)

    def train(self, mode: bool = True) -> ConvBNMish:
        if mode and self.fused:
            warnings.warn("training a model fused for inference: its convs have BatchNorm folded in, so it trains "
                          "without normalisation (fuse_for_inference is meant for eval mode)", stacklevel=2)
        return super().train(mode)

    @torch.no_grad()
    def fuse(self) -> ConvBNMish:
        """Fold BN into the conv (eval statistics); irreversible. Returns self."""
        if self.fused:
            return self
        from .fuse import fold_bn

        weight, bias = fold_bn(self.conv, self.bn)
        conv = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size,
                         self.conv.stride, self.conv.padding, bias=True).to(weight)
        if reference.memory_format_of(self.conv.weight) == torch.channels_last:  # a channels_last model's
            # layout stays (the Triton conv reads such a weight without a copy per call)
            conv = conv.to(memory_format=torch.channels_last)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        # the new modules take this one's mode (a module is built in training mode)
        self.conv, self.bn, self.fused = conv.train(self.training), nn.Identity().train(self.training), True
        return self


def drop_path(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth (timm's ``drop_path``): each sample of ``x`` [N, ...] zeroed with probability
    ``rate``, the others scaled by ``1 / (1 - rate)``."""
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def check_drop_path_rate(rate: float, name: str = "drop_path_rate") -> float:
    """``rate`` as a float when it is a valid stochastic-depth rate, in [0, 1); else a ValueError naming ``name``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {rate}")
    return float(rate)


class MishedDenseBlock(nn.Module):
    """SPEC §1.3: ``x1 = CBM1x1(x)``, ``x2 = CBM3x3(x1)``, ``out = x + cat([x1, x1 + x2])``.

    [N, c, H, W] -> [N, c, H, W]; ``c`` must be even. ``drop_path``: the stochastic-depth rate of the
    residual branch ``cat([x1, x1 + x2])`` in training (0: none, the paper's model).
    """

    def __init__(self, channels: int, drop_path: float = 0.0):
        super().__init__()
        if channels % 2:
            raise ValueError(f"MishedDenseBlock needs an even channel count, got {channels}")
        hidden = channels // 2
        self.conv1 = ConvBNMish(channels, hidden, 1)
        # x1 feeds conv2 and the concatenation: conv2's backward recomputes it instead of keeping it.
        self.conv2 = ConvBNMish(hidden, hidden, 3, recompute_input=True)
        self.drop_path = check_drop_path_rate(drop_path, "drop_path")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropping = self.training and self.drop_path > 0.0
        # A torch.fx trace (x a Proxy) takes this path too: the one below branches on dtypes and writes into
        # slices of a buffer, which a symbolic trace cannot follow (tracing under torch.no_grad would fail);
        # so does torch.jit.trace, whose ONNX conversion (torch.onnx.export(dynamo=False), Ultralytics'
        # export) drops those writes into slices.
        if torch.is_grad_enabled() or dropping or not isinstance(x, torch.Tensor) or torch.jit.is_tracing():
            # With autograd, x1 stays its own tensor: were it a slice of the output buffer, conv2 would save
            # that whole buffer for backward, and autograd would copy the buffer's gradient for each slice.
            x1 = self.conv1(x)
            x12 = self.conv2(x1, residual=x1)  # x1 + x2: the second layer receives the first through summation
            branch = torch.cat([x1, x12], dim=1)
            return x + (drop_path(branch, self.drop_path) if dropping else branch)
        # No autograd: both halves are written straight into their channel slices (the cat costs nothing),
        # in the dtype the convs produce (autocast's, when it casts x).
        hidden = x.shape[1] // 2
        branch = torch.empty_like(x, dtype=ops.autocast_dtype(x) or x.dtype)
        x1 = self.conv1(x, out=branch[:, :hidden])
        self.conv2(x1, residual=x1, out=branch[:, hidden:])
        return branch.add_(x) if branch.dtype == x.dtype else x + branch


class MirrorSplit(nn.Module, BackendMixin):
    """Module form of :func:`cspmirror.ops.mirror_split`: [N, C, H, W] -> [2N, C, H, P]."""

    def __init__(self, overlap: float = 0.25, axis: int = -1, mirror: bool = True):
        super().__init__()
        self.overlap = _validate.check_overlap(overlap)
        self.axis = _validate.check_axis(axis)
        self.mirror = mirror

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.mirror_split(x, self.overlap, self.axis, self.mirror, backend=self.backend)

    def extra_repr(self) -> str:
        return f"overlap={self.overlap}, axis={self.axis}, mirror={self.mirror}"


class MirrorFuse(nn.Module, BackendMixin):
    """Module form of :func:`cspmirror.ops.mirror_fuse`: parts [2N, C_i, H, P] -> [N, sum C_i, H, L]."""

    def __init__(self, overlap: float = 0.25, axis: int = -1, mirror: bool = True, reduce: str = "sum"):
        super().__init__()
        self.overlap = _validate.check_overlap(overlap)
        self.axis = _validate.check_axis(axis)
        self.mirror = mirror
        self.reduce = _validate.check_reduce(reduce)

    def forward(self, parts: list[torch.Tensor], length: int) -> torch.Tensor:
        return ops.mirror_fuse(parts, length, self.overlap, self.axis, self.mirror, self.reduce,
                               backend=self.backend)

    def extra_repr(self) -> str:
        return f"overlap={self.overlap}, axis={self.axis}, mirror={self.mirror}, reduce={self.reduce!r}"


def _block_rates(drop_path: Sequence[float], depth: int) -> list[float]:
    """One stochastic-depth rate per dense block: ``drop_path`` itself (``depth`` of them) or zeros."""
    rates = list(drop_path) or [0.0] * depth
    if len(rates) != depth:
        raise ValueError(f"drop_path needs one rate per dense block ({depth}), got {len(rates)}")
    return rates


class CSPMirrorBranch(nn.Module):
    """One section's body of a stage: expand, cross-stage partial split, dense blocks, transition.

    [B, c_out, H, P] -> (bypass [B, c_exp/2, H, P], processed [B, c_dense_out, H, P]).
    """

    def __init__(self, c_out: int, depth: int, expand_ratio: float, block_ratio: float, transition: bool,
                 drop_path: Sequence[float] = ()):
        super().__init__()
        c_exp = int(round(c_out * expand_ratio))
        c_blk = int(round(c_out * block_ratio))
        if c_exp % 2:
            raise ValueError(f"c_out * expand_ratio must be even, got {c_exp}")
        half = c_exp // 2
        self.expand = ConvBNMish(c_out, c_exp, 1)
        self.block_in = ConvBNMish(half, c_blk, 1) if c_blk != half else nn.Identity()
        self.blocks = nn.Sequential(*[MishedDenseBlock(c_blk, rate) for rate in _block_rates(drop_path, depth)])
        self.transition = ConvBNMish(c_blk, half, 1) if transition else nn.Identity()
        self.bypass_channels = half
        self.out_channels = half + (half if transition else c_blk)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        xs, xb = self.expand(x).split(self.bypass_channels, dim=1)
        return [xs, self.transition(self.blocks(self.block_in(xb)))]


FUSIONS = ("sum_concat", "concat_first")


def check_stage_knobs(overlap: float, axis: int, reduce: str, fusion: str) -> None:
    """The split and fusion knobs of a stage, checked whether or not the stage splits."""
    _validate.check_overlap(overlap)
    _validate.check_axis(axis)
    _validate.check_reduce(reduce)
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")


class CSPMirrorStage(nn.Module):
    """SPEC §1.4: downsample, mirrored split, shared-weight (or two-branch) CSP body, sum+concat fusion,
    final transition.

    [N, c_in, H, W] -> [N, c_out, ceil(H/2), ceil(W/2)].

    Args:
        split: split into two mirrored sections; False gives a plain CSP stage (channel concat only).
        siamese: both sections share one branch (run as one batch of 2N); False gives each its own weights.
        fusion: "sum_concat" (per-branch transition, then fuse) or "concat_first" (fuse the blocks' raw
            output and let the final transition do the work, the paper's Fig. 2(c)).
        drop_path: the stochastic-depth rate of each dense block, ``depth`` of them (empty: none).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        depth: int,
        expand_ratio: float = 1.0,
        block_ratio: float = 0.5,
        *,
        split: bool = True,
        overlap: float = 0.25,
        axis: int = -1,
        mirror: bool = True,
        siamese: bool = True,
        reduce: str = "sum",
        fusion: str = "sum_concat",
        drop_path: Sequence[float] = (),
    ):
        super().__init__()
        check_stage_knobs(overlap, axis, reduce, fusion)
        self.down = ConvBNMish(c_in, c_out, 3, stride=2)
        self.split = MirrorSplit(overlap, axis, mirror) if split else None
        self.fuse = MirrorFuse(overlap, axis, mirror, reduce) if split else None
        n_branches = 1 if (siamese or not split) else 2
        self.branches = nn.ModuleList(
            CSPMirrorBranch(c_out, depth, expand_ratio, block_ratio, transition=fusion == "sum_concat",
                            drop_path=drop_path)
            for _ in range(n_branches)
        )
        self.final = ConvBNMish(self.branches[0].out_channels, c_out, 1)
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        if self.split is None:
            return self.final(torch.cat(self.branches[0](x), dim=1))
        length = x.shape[self.axis]
        p = self.split(x)
        if len(self.branches) == 1:
            parts = self.branches[0](p)
        else:
            n = x.shape[0]
            per_branch = [branch(half) for branch, half in zip(self.branches, (p[:n], p[n:]), strict=True)]
            parts = [torch.cat(pair, dim=0) for pair in zip(*per_branch, strict=True)]
        return self.final(self.fuse(parts, length))
