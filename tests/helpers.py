"""Comparison helpers implementing SPEC §4."""

from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def triton_or_skip() -> None:
    """Skip unless the Triton backend can run here (GPU, or the interpreter on the CPU)."""
    pytest.importorskip("triton")
    from cspmirror.backends import triton_status

    status = triton_status()
    if not status.available:
        pytest.skip(status.reason, allow_module_level=True)  # some test modules call this at import


def extension_or_skip() -> None:
    """Skip unless the C++ extension is built for this machine (building it here on first use)."""
    from cspmirror.backends import extension_status

    status = extension_status()
    if not status.available:
        pytest.skip(f"extension unavailable: {status.reason}")


def fast_backend_or_skip(backend: str) -> None:
    """Skip unless ``backend`` ("triton" or "extension") can run here."""
    if backend == "triton":
        triton_or_skip()
    else:
        extension_or_skip()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf when ``out`` has NaN/inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref|`` in float64; inf when ``out`` has NaN/inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return (out - ref).abs().max().item() if out.numel() else 0.0


def assert_within_spec(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor | None,
                       fp32_tol: float, what: str = "", max_abs: bool = True) -> None:
    """SPEC §4: fp32 output within ``fp32_tol`` of the float64 reference; fp16/bf16 output (in the dtype of
    ``torch_lowp``) within 2x the error PyTorch's own eager op makes in that dtype (``torch_lowp``), + 1e-6.
    By the relative norm error and, with ``max_abs`` (one op's output), also by the largest element error
    (SPEC §4: "and by max abs error"; the norm alone dilutes a few wrong elements of a large tensor). Whole
    models pass ``max_abs=False``: see :func:`assert_within_torch_error`."""
    if torch_lowp is not None:
        assert out.dtype == torch_lowp.dtype, f"{what}: dtype {out.dtype}, expected {torch_lowp.dtype}"
    if out.dtype in (torch.float32, torch.float64) or torch_lowp is None:
        err = rel_err(out, ref64)
        assert err <= fp32_tol, f"{what}: rel err {err:.3g} > {fp32_tol:.1g}; {worst_elements(out, ref64)}"
        if max_abs:
            scale = ref64.detach().double().abs().max().item()
            worst = max_abs_err(out, ref64)
            assert worst <= fp32_tol * scale, (f"{what}: max abs err {worst:.3g} > {fp32_tol:.1g} x max|ref| "
                                               f"({scale:.3g}); {worst_elements(out, ref64)}")
    else:
        assert_within_torch_error(out, ref64, torch_lowp, what=what, max_abs=max_abs)


def assert_within_torch_error(out: torch.Tensor, ref64: torch.Tensor, torch_same: torch.Tensor,
                              floor: float = 0.0, what: str = "", max_abs: bool = False) -> None:
    """``out`` within ``max(floor, 2 x PyTorch's own error + 1e-6)`` of the float64 reference, PyTorch's own
    error being that of ``torch_same``, the reference computed in ``out``'s dtype (SPEC §4's low-precision rule;
    with a ``floor``, also the rule for quantities SPEC §4 gives no fp32 bound for, such as whole-model
    gradients, which fp32 cuDNN convolutions alone can carry past 1e-4). By the relative norm error, and with
    ``max_abs`` (one op's output) also by the largest element error against PyTorch's largest. Whole models
    leave that off: through a deep network, which element's rounding errors add up most is chance, and the
    largest of many such sums is too noisy to bound at 2x."""
    err, torch_err = rel_err(out, ref64), rel_err(torch_same, ref64)
    bound = max(floor, 2 * torch_err + 1e-6)
    assert err <= bound, (f"{what}: rel err {err:.3g} > {bound:.3g} "
                          f"(max of {floor:.1g} and 2 x PyTorch's {torch_err:.3g} + 1e-6); "
                          f"{worst_elements(out, ref64, torch_same)}")
    if max_abs:
        scale = ref64.detach().double().abs().max().item()
        worst, torch_worst = max_abs_err(out, ref64), max_abs_err(torch_same, ref64)
        abs_bound = max(floor * scale, 2 * torch_worst + 1e-6 * scale)
        assert worst <= abs_bound, (f"{what}: max abs err {worst:.3g} > {abs_bound:.3g} "
                                    f"(2 x PyTorch's {torch_worst:.3g}); {worst_elements(out, ref64, torch_same)}")


def worst_elements(out: torch.Tensor, ref64: torch.Tensor, torch_same: torch.Tensor | None = None,
                   count: int = 3) -> str:
    """The ``count`` elements of ``out`` farthest from ``ref64`` (non-finite ones first): index, value, the
    reference's (and PyTorch's) value, and how many elements differ from PyTorch's. What a failure message
    needs to tell a few gross errors from a spread of rounding-sized ones."""
    out, ref = out.detach().double().cpu().flatten(), ref64.detach().double().cpu().flatten()
    same = None if torch_same is None else torch_same.detach().double().cpu().flatten()
    shape = tuple(ref64.shape)
    worst = (out - ref).abs().nan_to_num(nan=float("inf")).topk(min(count, out.numel())).indices.tolist()

    def describe(i: int) -> str:
        index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), shape))
        theirs = "" if same is None else f" (PyTorch {same[i].item():.6g})"
        return f"{index}: {out[i].item():.6g} vs {ref[i].item():.6g}{theirs}"

    differing = "" if same is None else f"; {int((out != same).sum())} of {out.numel()} differ from PyTorch's"
    return "worst at " + ", ".join(describe(i) for i in worst) + differing


class Checks:
    """Runs several comparisons and fails once, at :meth:`done`, listing every one that failed (so that one
    GPU run shows them all, not only the first)."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, check, *args, **kwargs) -> None:
        try:
            check(*args, **kwargs)
        except AssertionError as exc:
            self.failures.append(str(exc).split("\n")[0])

    def done(self) -> None:
        assert not self.failures, f"{len(self.failures)} comparison(s) failed:\n" + "\n".join(self.failures)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN so that unwritten elements fail any comparison."""
    return t.fill_(float("nan"))


def to_layout(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    return x.contiguous(memory_format=layout)


@torch.no_grad()
def randomize_bn(model: torch.nn.Module, affine: bool = True) -> torch.nn.Module:
    """Non-trivial BatchNorm running statistics (and, with ``affine``, scale and shift), so that eval mode and
    BN folding are really exercised. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model
