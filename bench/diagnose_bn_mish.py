"""Diagnostics for two GPU test failures of ``bn_mish`` (GPU only; prints, and writes Triton IR under --out).

1. Eval backward sums: ``test_gpu_matches_reference[(64, 3, 33, 17)-fp16-contiguous-eval]`` got dweight and
   dbias grossly wrong (dx right) on an H200. The per-channel sums of ``g`` and ``g * x_hat`` from
   ``kernels.bn_mish.backward`` in eval, against float64, over shapes and dtypes around that case, with and
   without dx written in the same pass, under other warps and tile sizes; the kernels' IR is written out.
   (Found, 2026-11-27: wrong in every dtype once a channel had more than 16 partials, a Triton 3.6
   miscompile of a reduction inside a loop; fixed in ``_column_sums``.)
2. fp32 eval gradients: ``test_cspmirrornet53_parity_triton_vs_reference_gpu[fp32-eval-channels_last]`` had
   gradients at 2.5-3x the reference backend's error. Per op, against float64, for the Triton and reference
   backends: y, dx, dweight, dbias, a conv-weight-like sum ``sum_nhw(dx * u)`` per channel (where errors that
   share a sign add up), and Mish' alone (mean and signed mean error in ulps).
3. The same whole-model case with one thing switched at a time (bn_mish's backend, the mirror ops' backend,
   the convolutions' recomputed inputs), and the reference with an exactly rounded bn_mish
   (``tests/test_accelerate.py``'s ``exact_bn_mish``, the test's second yardstick). On the CPU (interpreter,
   32x32, some seeds) the exact bn_mish was 3-4x further from float64 than PyTorch's own fp32 ops: this part
   says whether the GPU failure is the same.

    python -m bench.diagnose_bn_mish [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.runner import resolve_device
from cspmirror import ops

DEVICE = torch.device("cuda")  # --device
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _case(shape: tuple[int, ...], dtype: torch.dtype, layout: torch.memory_format, seed: int = 0,
          loc: float = 0.5, scale: float = 2.0) -> dict[str, torch.Tensor]:
    """The test's case: x, dy like x; weight, bias, running mean and var [C] in x's dtype."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]

    def like_x(t: torch.Tensor) -> torch.Tensor:
        return t.to(DEVICE, dtype).contiguous(memory_format=layout)

    def vec(t: torch.Tensor) -> torch.Tensor:
        return t.to(DEVICE, dtype)

    return {
        "x": like_x(torch.randn(shape, generator=g) * scale + loc),
        "dy": like_x(torch.randn(shape, generator=g)),
        "weight": vec(torch.rand(c, generator=g) + 0.5),
        "bias": vec(torch.randn(c, generator=g) * 0.5),
        "mean": vec(torch.randn(c, generator=g) * 0.1 + loc),
        "var": vec((torch.rand(c, generator=g) + 0.5) * scale**2),
    }


def _exact_sums(case: dict[str, torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (g, sum_g, sum_g * x_hat) for eval: g = dy * mish'(x_hat * w + b)."""
    d = {k: v.double() for k, v in case.items()}
    x_hat = (d["x"] - d["mean"][:, None, None]) / torch.sqrt(d["var"][:, None, None] + eps)
    v = (x_hat * d["weight"][:, None, None] + d["bias"][:, None, None]).requires_grad_()
    (g,) = torch.autograd.grad(F.mish(v), v, d["dy"])
    return g, g.sum((0, 2, 3)), (g * x_hat).sum((0, 2, 3))


def _rel(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm().clamp(min=1e-300)).item()


@contextlib.contextmanager
def _knobs(**values: object) -> Iterator[None]:
    from cspmirror.kernels import bn_mish as kernels

    old = {k: getattr(kernels, k) for k in values}
    for k, v in values.items():
        setattr(kernels, k, v)
    kernels._cached_plan.cache_clear()
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(kernels, k, v)
        kernels._cached_plan.cache_clear()


def eval_sums() -> None:
    from cspmirror.kernels import bn_mish as kernels

    eps = 1e-5
    print("== 1. eval backward sums vs float64 (rel err of sum_g, sum_gx; dx rel err)")
    shapes = [(64, 3, 33, 17), (64, 3, 32, 16), (2, 3, 33, 17), (64, 4, 33, 17), (64, 5, 33, 17), (8, 3, 8, 8)]
    knob_sets = [{}, {"NUM_WARPS": 4}, {"TILE": 2048}, {"TILE": 1024}]
    for knobs in knob_sets:
        with _knobs(**knobs):
            for shape in shapes if not knobs else shapes[:1]:
                for name, dtype in DTYPES.items() if not knobs else [("fp16", torch.float16)]:
                    case = _case(shape, dtype, torch.contiguous_format)
                    g64, sum_g64, sum_gx64 = _exact_sums(case, eps)
                    plan = kernels.make_plan(case["x"])
                    for write_dx in (True, False):
                        dx = torch.full_like(case["x"], float("nan")) if write_dx else None
                        sum_g, sum_gx = kernels.backward(case["dy"], case["x"], case["mean"], case["var"], eps,
                                                         case["weight"], case["bias"], False, dx, True)
                        dx_err = "" if dx is None else f" dx {_rel(dx, _dx64(case, g64, eps)):.2e}"
                        print(f"  {knobs or 'default'} {shape} {name} dx={'yes' if write_dx else 'no '}: "
                              f"sum_g {_rel(sum_g, sum_g64):.2e} sum_gx {_rel(sum_gx, sum_gx64):.2e}{dx_err}"
                              f"  [block_c {plan.block_c} block_b {plan.block_b} items {plan.items}]")


def _dx64(case: dict[str, torch.Tensor], g64: torch.Tensor, eps: float) -> torch.Tensor:
    d = {k: v.double() for k, v in case.items()}
    return g64 * (d["weight"] / torch.sqrt(d["var"] + eps))[:, None, None]


def dump_ir(out: Path) -> None:
    from cspmirror.kernels import bn_mish as kernels

    folder = out / "ttgir"
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for fn_name in ("_backward_kernel",):
        fn = getattr(kernels, fn_name)
        caches = getattr(fn, "device_caches", {})
        for device_cache in caches.values():
            compiled_map = device_cache[0] if isinstance(device_cache, tuple) else device_cache
            for i, compiled in enumerate(compiled_map.values()):
                for kind in ("ttgir", "ptx"):
                    text = compiled.asm.get(kind)
                    if text:
                        (folder / f"{fn_name}-{i}.{kind}").write_text(text if isinstance(text, str) else str(text))
                        count += 1
    print(f"wrote {count} IR files under {folder}")


def _mish_grad_ulps(v: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """(mean |err|, signed mean err) of ``grad`` against float64 Mish' of ``v``, in float32 ulps."""
    v64 = v.double().requires_grad_()
    (exact,) = torch.autograd.grad(F.mish(v64), v64, torch.ones_like(v64))
    magnitude = exact.abs().clamp(min=1e-3).float()
    ulp = (torch.nextafter(magnitude, torch.tensor(float("inf"), device=v.device)) - magnitude).double()
    err = (grad.double() - exact) / ulp
    return err.abs().mean().item(), err.mean().item()


def _tests_importable() -> None:
    """Put ``tests/`` on the path: its helpers and probes are shared with this script."""
    import sys

    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def fp32_eval_accuracy() -> None:
    eps = 1e-5
    print("== 2. fp32 eval bn_mish vs float64: rel err (triton | reference)")
    for shape, layout_name, loc, scale in [((2, 128, 32, 32), "cl", 0.5, 2.0), ((2, 128, 32, 32), "cl", 0.0, 30.0),
                                           ((2, 128, 32, 32), "cf", 0.0, 30.0), ((2, 512, 8, 8), "cl", 2.0, 10.0)]:
        layout = torch.channels_last if layout_name == "cl" else torch.contiguous_format
        case = _case(shape, torch.float32, layout, seed=1, loc=loc, scale=scale)
        u = F.mish(torch.randn(shape, device=DEVICE, dtype=torch.float64))
        results = {}
        for backend in ("triton", "reference", "f64"):
            dtype = torch.float64 if backend == "f64" else torch.float32
            x, w, b = (case[k].to(dtype).detach().requires_grad_() for k in ("x", "weight", "bias"))
            y = ops.bn_mish(x, w, b, case["mean"].to(dtype).clone(), case["var"].to(dtype).clone(), False, 0.1,
                            eps, None, backend="reference" if backend == "f64" else backend)
            dx, dw, db = torch.autograd.grad(y, (x, w, b), case["dy"].to(dtype))
            results[backend] = {"y": y.detach(), "dx": dx, "dw": dw, "db": db,
                                "sum(dx*u)": (dx.double() * u).sum((0, 2, 3))}
        line = []
        for key in ("y", "dx", "dw", "db", "sum(dx*u)"):
            t, r = (_rel(results[k][key], results["f64"][key]) for k in ("triton", "reference"))
            line.append(f"{key} {t:.2e} | {r:.2e}")
        print(f"  {shape} {layout_name} x~N({loc},{scale}): " + "; ".join(line))
    v = torch.randn(1 << 22, device=DEVICE) * 3
    _tests_importable()
    from test_triton_activations import _probe  # the kernels' (mish, mish') of v

    _, ours = _probe(v)
    v_ = v.clone().requires_grad_()
    (theirs,) = torch.autograd.grad(F.mish(v_), v_, torch.ones_like(v_))
    for name, grad in (("triton", ours), ("pytorch", theirs)):
        mean, signed = _mish_grad_ulps(v, grad)
        print(f"  Mish' on v ~ N(0, 3): {name} mean |err| {mean:.3f} ulp, signed mean {signed:+.4f} ulp")


def model_gradients(size: int = 128) -> None:
    """The failing whole-model case with each op's backend switched alone: per parameter gradient, the rel
    err against float64 over the reference backend's own (ratio), and how many exceed the test's bound."""
    _tests_importable()
    import test_accelerate as ta
    from helpers import randomize_bn, rel_err

    import cspmirror
    from cspmirror.layers import BatchNormMish2d, ConvBNMish, MirrorFuse, MirrorSplit

    print(f"== 3. cspmirrornet53 fp32 eval {size}x{size}: gradient rel err / the reference backend's, per config")
    for layout_name, layout in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
        torch.manual_seed(0)
        model = randomize_bn(cspmirror.cspmirrornet53(), affine=False).to(DEVICE).to(memory_format=layout).eval()
        x = ta._input(DEVICE, size=size, layout=layout)
        ref64 = ta._copy(model, "reference", torch.float64)
        cotangents = ta._cotangents(ref64, x)
        _, grads64 = ta._run(ref64, x, cotangents)
        _, grads_ref = ta._run(ta._copy(model, "reference", torch.float32), x, cotangents)
        ref_err = {k: rel_err(grads_ref[k], g) for k, g in grads64.items()}
        configs = {
            "all triton": ("triton", None, None),
            "triton, bn_mish reference": ("triton", (BatchNormMish2d,), "reference"),
            "triton, mirror ops reference": ("triton", (MirrorSplit, MirrorFuse), "reference"),
            "triton, convs keep their input": ("triton", (ConvBNMish,), False),
            "reference, bn_mish triton": ("reference", (BatchNormMish2d,), "triton"),
            "reference again": ("reference", None, None),
        }
        with ta.exact_bn_mish():  # the most accurate a fused bn_mish can be: the test's second yardstick
            _, grads_exact = ta._run(ta._copy(model, "reference", torch.float32), x, cotangents)
        ratios = sorted(rel_err(grads_exact[k], g) / max(ref_err[k], 1e-12) for k, g in grads64.items())
        print(f"  {layout_name} reference, bn_mish exact (float64, rounded once): ratio median "
              f"{ratios[len(ratios) // 2]:.2f} p90 {ratios[int(len(ratios) * 0.9)]:.2f} max {ratios[-1]:.2f}")
        for name, (base, kinds, other) in configs.items():
            m = ta._copy(model, base, torch.float32)
            if kinds:
                for module in m.modules():
                    if isinstance(module, ConvBNMish) and other is False:
                        module.recompute_input = False  # no recomputed conv input (cspmirror.ops.recompute)
                    elif isinstance(module, kinds):
                        module.backend = other
            _, grads = ta._run(m, x, cotangents)
            ratios = sorted(rel_err(grads[k], g) / max(ref_err[k], 1e-12) for k, g in grads64.items())
            over = sum(rel_err(grads[k], g) > max(1e-4, 2 * ref_err[k] + 1e-6) for k, g in grads64.items())
            print(f"  {layout_name} {name}: ratio median {ratios[len(ratios) // 2]:.2f} p90 "
                  f"{ratios[int(len(ratios) * 0.9)]:.2f} max {ratios[-1]:.2f}; {over} of {len(ratios)} over the bound")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/diagnose"))
    parser.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 (a dry run)")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (comma-separated numbers)")
    parser.add_argument("--model-size", type=int, default=128, help="part 3's image size")
    args = parser.parse_args()
    parts = {"1": eval_sums, "2": fp32_eval_accuracy, "3": lambda: model_gradients(args.model_size)}
    unknown = [p for p in args.parts.split(",") if p not in parts]
    if unknown:
        parser.error(f"argument --parts: unknown part(s) {unknown}; the parts are {','.join(parts)}")
    global DEVICE
    DEVICE = resolve_device(args.device)
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu runs the Triton kernels in their interpreter: set TRITON_INTERPRET=1")
    import triton

    print(torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else DEVICE, torch.__version__,
          triton.__version__)
    failed = []
    for number in args.parts.split(","):
        try:
            parts[number]()
        except Exception as exc:  # one part's failure must not hide the other's output
            print(f"part {number} failed: {type(exc).__name__}: {exc}")
            failed.append(number)
    dump_ir(args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
