"""An eager fast path for the registered ops: ``torch.library.custom_op`` ones and the extension's C++ operators.

A custom op's Python dispatch (schema checks, filling defaults, the generated ``autograd.Function``, the
Dynamo guard around the implementation) costs tens of microseconds per call: for small tensors on a GPU, as
much as the kernels themselves. :class:`EagerOp` runs the same implementation, ``setup_context`` and
``backward`` through a lightweight ``autograd.Function`` in plain eager mode, and the registered op
everywhere else (``torch.compile``, tracing, export, fake or subclassed tensors, any dispatch mode), where
its fake implementation and schema are what make it work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def _tensors(args: tuple) -> list[torch.Tensor]:
    """The tensors among ``args``, those inside list arguments included."""
    found = []
    for a in args:
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, torch.Tensor))
    return found


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a Parameter is a plain tensor to every op
functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by vmap, as the gradients a backward gets under
    ``torch.autograd.grad(..., is_grads_batched=True)`` and ``torch.autograd.functional.jacobian(...,
    vectorize=True)`` (PyTorch's legacy vmap), or under a ``torch.func.vmap`` of a backward: a wrapper that looks
    like a plain tensor, with no data a kernel could read. False while torch.compile traces (Dynamo cannot trace
    the check, and its fake tensors are not batched)."""
    if torch.compiler.is_compiling():
        return False
    return _legacy_batched(t) or torch._C._functorch.is_batchedtensor(t)


def plain_eager(tensors: list[torch.Tensor]) -> bool:
    """Whether a call on ``tensors`` may bypass the registered op: eager mode, plain tensors with data (not on
    the meta device, which the registered op's fake implementation serves, nor batched by the legacy vmap,
    which the registered op runs one sample at a time), no dispatch mode and no ``torch.func`` transform
    (whose wrapped tensors look like plain ones)."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not functorch_active()
            and _get_current_dispatch_mode() is None
            and all(type(t) in _PLAIN and not t.is_meta and not _legacy_batched(t) for t in tensors))


def bump_versions(tensors: list[torch.Tensor | None]) -> None:
    """Mark ``tensors`` as written in place, as the dispatcher does for a registered op's mutated arguments, so
    that a backward that saved one of them raises instead of reading the new values. Needed wherever an op's
    implementation is called directly (the C++ operators' ``(a!)`` arguments, the eager fast path); a no-op
    while compiling, where functionalization tracks the mutation."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None:
            torch.autograd.graph.increment_version(t)


class EagerOp:
    """Callable like the custom op ``op`` (positional arguments), with an eager fast path.

    Args:
        op: the registered op (``torch.library.custom_op(...)(impl)``), or a function of registered ops that
            computes what ``impl`` does.
        impl: the implementation.
        setup_context, backward: what ``op.register_autograd`` was given (None: no autograd), written for
            the op's signature; a list-of-tensors argument gets a list of gradients, as for the custom op.
            In the eager path an output that received no gradient passes None to ``backward``, not zeros
            (the registered op's autograd fills zeros).
        mutates: positions of the arguments the op writes in place (its ``mutates_args``): their version
            counters are bumped, as the dispatcher does, so that autograd still catches a stale saved tensor.
    """

    def __init__(self, op: Callable, impl: Callable, setup_context: Callable | None = None,
                 backward: Callable | None = None, mutates: tuple[int, ...] = ()) -> None:
        self.op, self.impl, self.mutates = op, impl, mutates
        self.function = None if backward is None else _function(impl, setup_context, backward)

    def __call__(self, *args: Any) -> Any:
        tensors = _tensors(args)
        if not plain_eager(tensors):
            return self.op(*args)
        if self.function is None or not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            result = self.impl(*args)
        else:
            flat, unflatten = _flatten(args)
            result = self.function.apply(unflatten, *flat)
        bump_versions([args[i] for i in self.mutates])
        return result


def _flatten(args: tuple) -> tuple[tuple | list, Callable[[tuple], tuple] | None]:
    """``args`` with list-of-tensor arguments spread out (``autograd.Function`` only tracks top-level
    tensors), and the function that puts them back (None when there is no list: ``args`` as they are)."""
    if not any(isinstance(a, (list, tuple)) for a in args):
        return args, None
    flat, spans = [], []
    for a in args:
        if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
            spans.append((len(flat), len(a)))
            flat.extend(a)
        else:
            spans.append((len(flat), None))
            flat.append(a)

    def unflatten(values: tuple) -> tuple:
        return tuple(values[start] if count is None else list(values[start:start + count])
                     for start, count in spans)

    return flat, unflatten


def _function(impl: Callable, setup_context: Callable, backward: Callable) -> type[torch.autograd.Function]:
    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, unflatten, *flat):
            inputs = flat if unflatten is None else unflatten(flat)
            output = impl(*inputs)
            # As the custom op's backward sees it: one flag per argument (any, for a list of tensors).
            ctx.needs_input_grad = (ctx.needs_input_grad[1:] if unflatten is None else
                                    tuple(any(flags) if isinstance(flags, list) else flags
                                          for flags in unflatten(ctx.needs_input_grad[1:])))
            setup_context(ctx, inputs, output)
            # No zero-filled gradients for outputs that got none (bn_mish's batch statistics, in every
            # backward): the op's backward reads only gradients autograd gives it.
            ctx.set_materialize_grads(False)
            ctx.num_inputs = len(flat)
            return output

        @staticmethod
        def backward(ctx, *grads):
            if all(g is None for g in grads):
                return (None,) * (1 + ctx.num_inputs)
            per_input = backward(ctx, *grads)
            flat = []
            for grad in per_input:
                flat.extend(grad if isinstance(grad, (list, tuple)) else [grad])
            return (None, *flat)

    _Eager.__name__ = _Eager.__qualname__ = f"Eager_{impl.__name__}"
    return _Eager
