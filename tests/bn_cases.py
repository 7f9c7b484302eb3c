"""bn_mish test cases shared by the Triton and extension tests: random inputs, forward + backward on any
backend, and the SPEC §4 comparison against the float64 reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from helpers import Checks, assert_within_spec, to_layout

from cspmirror import ops

LOW = (torch.float16, torch.bfloat16)
FWD_TOL, BWD_TOL = 1e-5, 1e-4  # SPEC §4, fp32 vs the float64 reference


@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    residual: torch.Tensor | None
    grad: torch.Tensor
    training: bool
    momentum: float = 0.1
    eps: float = 1e-5


def make_case(shape, dtype=torch.float32, layout=torch.contiguous_format, device="cpu", *, training=True,
              residual=True, affine=True, running=True, param_dtype=None, loc=0.5, scale=2.0) -> Case:
    c = shape[1]

    def vec(t):
        return t.to(device=device, dtype=param_dtype or dtype)

    def like_x(t):
        return to_layout(t.to(device=device, dtype=dtype), layout)

    return Case(
        x=like_x(torch.randn(shape) * scale + loc),
        weight=vec(torch.rand(c) + 0.5) if affine else None,
        bias=vec(torch.randn(c) * 0.5) if affine else None,
        running_mean=vec(torch.randn(c) * 0.1 + loc) if running else None,
        running_var=vec((torch.rand(c) + 0.5) * scale**2) if running else None,
        residual=like_x(torch.randn(shape)) if residual else None,
        grad=like_x(torch.randn(shape)),
        training=training,
    )


def run(case: Case, backend: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> dict:
    """Forward and backward on fresh copies of the case's tensors (cast to ``dtype`` when given): y, the
    gradients dx, dweight, dbias, dresidual, and the updated running statistics."""

    def copy_of(t, grad=False):
        if t is None:
            return None
        t = t.detach().to(dtype) if dtype is not None else t.detach().clone()
        return t.requires_grad_(grad)

    leaves = {name: copy_of(getattr(case, name), True) for name in ("x", "weight", "bias", "residual")}
    rm, rv = copy_of(case.running_mean), copy_of(case.running_var)
    y = ops.bn_mish(leaves["x"], leaves["weight"], leaves["bias"], rm, rv, case.training, case.momentum,
                    case.eps, leaves["residual"], out=out, backend=backend)
    wanted = {k: t for k, t in leaves.items() if t is not None}
    grads = torch.autograd.grad(y, list(wanted.values()), case.grad.to(y.dtype))
    result = {"y": y, **{f"d{k}": g for k, g in zip(wanted, grads, strict=True)}}
    if rm is not None:
        result.update(running_mean=rm, running_var=rv)
    return result


def check_bn_case(case: Case, backend: str) -> dict:
    """``backend`` vs the float64 reference within SPEC §4 (fp16/bf16: vs PyTorch's own error); returns the
    backend's results."""
    got = run(case, backend)
    ref = run(case, "reference", torch.float64)
    lowp = run(case, "reference") if case.x.dtype in LOW else None
    assert got.keys() == ref.keys()
    checks = Checks()
    for name, value in got.items():
        tol = BWD_TOL if name.startswith("d") else FWD_TOL
        checks(assert_within_spec, value, ref[name], None if lowp is None else lowp[name], tol, what=name)
    checks.done()
    assert got["y"].dtype == case.x.dtype and got["dx"].dtype == case.x.dtype
    return got
