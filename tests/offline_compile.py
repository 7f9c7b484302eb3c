"""Ahead-of-time compiles of the Triton kernels for Hopper (sm_90) on a machine without a GPU.

:func:`hopper_source` specialises a kernel exactly as a launch with given arguments would (alignment and
divisibility of each argument, constexprs), and :func:`compile_for_hopper` compiles it down to a cubin. Both
use Triton's launch binder, an internal API: :class:`InternalsDiffer` says where it differs.
``tests/test_triton_compile.py`` uses them on representative launches. Run as a script, this file compiles
every kernel specialisation that a whole model launches, in a training step and an eval forward:

    python tests/offline_compile.py [--model cspmirrornet53] [--batch 2] [--size 256]

The model runs on CPU tensors with each Triton launch replaced by a compile (nothing is computed; the outputs
are garbage), in bf16 and fp32, NCHW and channels_last; the report counts specialisations, failures and
local-memory spills, and exits 1 on any failure. With ``PYTHONPATH`` pointing at another Triton (e.g. the GPU
machine's: ``pip install --no-deps --target DIR triton==<version>``) it checks that version, offline: a
compile error only that version makes (as Triton 3.6 did with string constexprs) shows here instead of on a
lent GPU. Not covered: the conv's autotuner, which under some Triton versions needs a driver.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable

HOPPER = ("cuda", 90, 32)


class InternalsDiffer(Exception):
    """Triton's launch binder is not the one this file was written against."""


def hopper_source(kernel, args: tuple, kwargs: dict) -> tuple[object, dict]:
    """(the ``ASTSource`` a launch of ``kernel`` with ``args`` / ``kwargs`` compiles for sm_90, its options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    backend = make_backend(GPUTarget(*HOPPER))
    kwargs = {"debug": False, **kwargs}
    try:
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    except (ImportError, AttributeError, TypeError) as exc:
        raise InternalsDiffer(f"{type(exc).__name__}: {exc}") from exc
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def compile_for_hopper(kernel, args: tuple, kwargs: dict):
    """Compile ``kernel`` for sm_90 as a launch with ``args`` / ``kwargs`` would specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget

    source, options = hopper_source(kernel, args, kwargs)
    return triton.compile(source, target=GPUTarget(*HOPPER), options=options)


def spills(compiled) -> bool:
    """Whether the compiled kernel reads or writes local memory (register spills)."""
    return bool(re.search(r"\b(?:ld|st)\.local", compiled.asm["ptx"]))


def compiling_launches(on_launch: Callable[[str, object], None]) -> None:
    """Replace every Triton launch (``JITFunction.run``) by a compile of the specialisation it would launch,
    each specialisation compiled once; ``on_launch(kernel name, compiled kernel or the exception)``."""
    from triton.runtime.jit import JITFunction

    seen: set[str] = set()

    def run(self, *args, grid, warmup, **kwargs):
        source, options = hopper_source(self, args, kwargs)
        key = f"{self.__name__} {source.hash()} {sorted(options.items())}"
        if key in seen:
            return
        seen.add(key)
        try:
            on_launch(self.__name__, compile_for_hopper(self, args, kwargs))
        except InternalsDiffer:
            raise
        except Exception as exc:  # noqa: BLE001 - a compile error is what this reports
            on_launch(self.__name__, exc)

    JITFunction.run = run


def model_report(model_name: str, batch: int, size: int) -> dict:
    """Compile what ``model_name`` launches on the Triton backend (training step, eval forward; bf16 and fp32;
    NCHW and channels_last): {"compiled": n, "spills": [...], "failures": [...]}."""
    import torch
    from cspmirror.kernels import bn_mish

    import cspmirror
    from cspmirror import backends

    report: dict = {"compiled": 0, "spills": [], "failures": []}

    def on_launch(name: str, result: object) -> None:
        if isinstance(result, Exception):
            report["failures"].append(f"{name}: {type(result).__name__}: {str(result)[:300]}")
        else:
            report["compiled"] += 1
            if spills(result):
                report["spills"].append(name)

    compiling_launches(on_launch)
    backends.triton_status = lambda device=None: backends.BackendStatus("triton", True, "launches compiled")
    bn_mish.target_programs = lambda device: bn_mish.PROGRAMS_PER_SM * 132  # plans as for an H100 / H200
    for dtype in (torch.bfloat16, torch.float32):
        for layout in (torch.contiguous_format, torch.channels_last):
            t0 = time.time()
            model = cspmirror.get_model(model_name, num_classes=10).to(dtype).to(memory_format=layout)
            cspmirror.accelerate(model, "triton")
            x = torch.randn(batch, 3, size, size, dtype=dtype).contiguous(memory_format=layout)
            model.train()
            model(x).float().sum().backward()
            model.eval()
            with torch.no_grad():
                model(x)
            print(f"{model_name} {dtype} {layout}: {report['compiled']} compiled so far ({time.time() - t0:.0f} s)",
                  flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cspmirrornet53")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}, sm_{HOPPER[1]}", flush=True)
    try:
        report = model_report(args.model, args.batch, args.size)
    except InternalsDiffer as exc:
        print(f"Triton's launch binder differs here: {exc}")
        return 3
    print(f"{report['compiled']} specialisations compiled, {len(report['failures'])} failed, "
          f"{len(report['spills'])} spill")
    for line in report["failures"] + [f"spills: {name}" for name in report["spills"]]:
        print(line)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
