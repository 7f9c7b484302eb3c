"""Non-finite inputs (+-inf, NaN) and values near the dtype's max through the fast backends' ``bn_mish``: the
same infs and NaNs as the reference, in the output, the gradients and the running statistics.

Not pinned: channels whose sums overflow fp32 (|x| near 1e37 and above, fp32 or bf16), where both fast
backends, which sum in fp32, can give NaN or inf where the reference stays finite, or the other way round.
"""

from __future__ import annotations

import pytest
import torch
from helpers import LAYOUTS, fast_backend_or_skip, to_layout

from cspmirror import ops

INF = float("inf")


@pytest.fixture(params=["triton", "extension"])
def backend(request) -> str:
    fast_backend_or_skip(request.param)
    return request.param


def assert_same_values(out: torch.Tensor, ref: torch.Tensor) -> None:
    """NaN and +-inf exactly where ``ref`` has them; finite values close."""
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), rtol=2e-2, atol=2e-2, equal_nan=True)


def run_bn_mish(x: torch.Tensor, training: bool, backend: str) -> dict[str, torch.Tensor]:
    """Output, gradients (x, weight, bias) and running statistics of one ``bn_mish`` call."""
    c = x.shape[1]
    x = x.detach().clone().requires_grad_(True)
    weight = torch.ones(c, device=x.device, requires_grad=True)
    bias = torch.full((c,), 0.5, device=x.device, requires_grad=True)
    running_mean = torch.zeros(c, device=x.device)
    running_var = torch.ones(c, device=x.device)
    y = ops.bn_mish(x, weight, bias, running_mean, running_var, training, backend=backend)
    y.backward(torch.linspace(-1, 1, y.numel(), device=x.device).reshape(y.shape).to(y.dtype))
    return {"y": y.detach(), "dx": x.grad, "dw": weight.grad, "db": bias.grad,
            "running_mean": running_mean, "running_var": running_var}


def check_against_reference(x: torch.Tensor, training: bool, backend: str) -> None:
    ref = run_bn_mish(x, training, "reference")
    out = run_bn_mish(x, training, backend)
    for name, value in ref.items():
        try:
            assert_same_values(out[name], value)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


@pytest.mark.parametrize("value", [INF, -INF])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_batch_with_inf(backend, device, value, dtype, layout):
    """A batch holding +-inf: that channel's running mean is +-inf, as BatchNorm2d's (was NaN: the statistics'
    shift, the channel's first value or first tile's mean, was inf and every x - shift NaN); a NaN elsewhere
    stays in its channel."""
    x = torch.randn(2, 3, 2, 3, device=device, dtype=dtype)
    x[0, 1, 0, 0] = value  # the channel's first element: the shift of the statistics
    x[1, 0, 1, 2] = value  # a later one
    x[1, 2, 0, 1] = float("nan")
    check_against_reference(to_layout(x, layout), True, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_gradients_at_extremes(backend, device, dtype, layout):
    """Mish's derivative at +inf is NaN, as PyTorch's (the fast backends gave 1: a finite gradient, bias
    gradient 0 for a channel of +inf); at -3e38 it is 0 (was NaN: 4 v overflowed to -inf, times e^v = 0)."""
    x = torch.randn(2, 3, 2, 3, device=device, dtype=dtype)
    x[0, 0, 1, 1] = -3e38
    x[:, 1] = INF
    x[1, 2, 0, 2] = INF
    check_against_reference(to_layout(x, layout), False, backend)
