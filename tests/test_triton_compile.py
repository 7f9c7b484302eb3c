"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

The interpreter checks what the kernels compute, not whether the compiler accepts them (layouts, reshapes,
splits and joins, vector widths). Here the launchers run on CPU tensors with ``JITFunction.run`` replaced by an
ahead-of-time compile for sm_90, specialised exactly as a launch would be (alignment and divisibility of the
arguments), down to a cubin. Checked: every kernel compiles, the mirror kernels' loads and stores at the
benchmark layout are all 16-byte vectors (the mirrored part too, flat tiles too), the implicit-GEMM conv
multiplies on Hopper's wgmma from operands copied 16 bytes at a time (bf16 and tf32), Mish in fp32 takes the
accurate exp and half precision the fast one, and nothing spills to local memory.

The test session runs Triton's interpreter (conftest), under which ``@triton.jit`` gives interpreted functions
and the launchers plan for the interpreter; so the compile runs in a fresh process without it (this file,
run as a script). It uses Triton's launch binder, an internal API: skipped where that differs, and where a
GPU runs the real kernels anyway (the ``gpu`` tests).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from offline_compile import InternalsDiffer, compile_for_hopper, spills

ROOT = Path(__file__).resolve().parent.parent


def _report() -> dict:
    """Run the launchers with compiling launches; {kernel: [{cubin, memory ops, spills}] per launch}."""
    import torch
    from cspmirror.kernels import bn_mish, conv, mirror
    from triton.runtime.jit import JITFunction

    launches: dict[str, list[dict]] = {}

    def run(self, *args, grid, warmup, **kwargs):
        kernel = compile_for_hopper(self, args, kwargs)
        ptx = kernel.asm["ptx"]
        launches.setdefault(self.__name__, []).append({
            "cubin": "cubin" in kernel.asm,
            "memory_ops": sorted(set(re.findall(r"\b(?:ld|st)\.global[.\w]*", ptx))),
            "spills": spills(kernel),
            "l2_hints": sorted(set(re.findall(r"L2::evict_\w+", ptx))),
            "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
            "async_copy_sizes": sorted(set(re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)",
                                                      ptx))),
            "exp": sorted(set(re.findall(r"\bex2\.approx[.\w]*", ptx))),
            "dtype": str(next(a.dtype for a in args if isinstance(a, torch.Tensor))),
        })

    JITFunction.run = run
    bn_mish.target_programs = lambda device: bn_mish.PROGRAMS_PER_SM * 132
    for flat in (False, True):  # the default tiling, then flat tiles with the split's reads first
        mirror.TILINGS = mirror.tilings_with(flat=flat, split_loads_first=flat)
        for dtype in (torch.float32, torch.bfloat16):  # W = 64, P = 40: 16-byte rows in both dtypes
            for layout in (torch.contiguous_format, torch.channels_last):
                x = torch.empty(2, 8, 4, 64, dtype=dtype).contiguous(memory_format=layout)
                y = torch.empty(4, 8, 4, 40, dtype=dtype).contiguous(memory_format=layout)
                mirror.split(x, y, 64, 40, -1, True, halve=False)
                mirror.fuse_part(y, torch.empty_like(x), 64, 40, -1, True, mean=True)
    ones, zeros = torch.ones(16), torch.zeros(16)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.empty(4, 16, 8, 8, dtype=dtype)
        mean, var = bn_mish.train_forward(x, ones, zeros, None, 1e-5, torch.empty_like(x))
        bn_mish.update_running(mean, var, zeros.clone(), ones.clone(), 0.1, 256)
        bn_mish.train_forward(x, ones, zeros, None, 1e-5, torch.empty_like(x), (zeros.clone(), ones.clone(), 0.1))
        bn_mish.apply(x, mean, var, 1e-5, ones, zeros, None, torch.empty_like(x))
        for training in (True, False):
            bn_mish.backward(x, x, mean, var, 1e-5, ones, zeros, training, torch.empty_like(x), True)
    bn_mish.L2_HINTS = {"forward": True, "backward": True}  # the training passes again, hints on in both
    bn_mish.train_forward(x, ones, zeros, None, 1e-5, torch.empty_like(x))
    bn_mish.backward(x, x, mean, var, 1e-5, ones, zeros, True, torch.empty_like(x), True)
    os.environ[conv.AUTOTUNE_ENV] = "0"  # the first Hopper config that fits (no benchmarking without a GPU)
    # Triton < 3.7 still times (and caches on disk, keyed by the driver's target) a lone pruned config.
    conv._conv_mish_kernel._bench = lambda *args, config, **kwargs: [0.0, 0.0, 0.0]
    conv._conv_mish_kernel.cache_results = False
    for dtype in (torch.bfloat16, torch.float32):  # a 3x3 layer of cspmirrornet53, fp32 in tf32
        x = torch.empty(32, 128, 64, 64, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.empty(128, 128, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
        conv.conv_mish(x, weight, torch.empty(128, dtype=dtype), x, torch.empty_like(x), 1, tf32=True)
    return launches


def _jit_functions(tree: ast.Module) -> list[ast.FunctionDef]:
    def is_jit(decorator: ast.expr) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return isinstance(target, ast.Attribute) and target.attr == "jit"

    return [node for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and any(is_jit(d) for d in node.decorator_list)]


def test_device_code_passes_no_python_constants_as_constexprs():
    """Triton 3.6 (the GPU machine's) fails to compile a call between ``@triton.jit`` functions that passes a
    string written in device code, a parameter's default value included (``AttributeError: 'str' object has
    no attribute 'type'``, seen on an H200), where later Tritons take it. Strings come from the launch."""
    offenders = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for fn in _jit_functions(ast.parse(path.read_text())):
            if fn.args.defaults or any(d is not None for d in fn.args.kw_defaults):
                offenders.append(f"{path.name}:{fn.lineno} {fn.name}: default parameter values")
            for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)):
                if any(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in call.args):
                    offenders.append(f"{path.name}:{call.lineno} {fn.name}: a string argument to {call.func.id}")
    assert not offenders, offenders


def test_kernels_compile_for_hopper(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU runs the real kernels (the gpu tests)")
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    done = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    launches = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"mirror_split_kernel", "mirror_fuse_kernel", "_train_forward_kernel", "_running_kernel", "_apply_kernel",
            "_train_backward_kernel", "_backward_kernel", "_conv_mish_kernel"} <= set(launches)
    for name, runs in launches.items():
        for r in runs:
            assert r["cubin"] and not r["spills"], (name, r)
            if name.startswith("mirror_"):  # no scalar access, the mirrored reads included
                assert set(r["memory_ops"]) <= {"ld.global.v4.b32", "st.global.v4.b32"}, (name, r)
    # Mish in fp32: the kernels' own exp (plain fp32 arithmetic, no ex2 at all), never the bare fast ex2 that
    # half precision keeps (see kernels/activations.py)
    for name in ("_train_forward_kernel", "_apply_kernel", "_backward_kernel", "_train_backward_kernel",
                 "_conv_mish_kernel"):
        assert {r["dtype"] for r in launches[name]} == {"torch.float32", "torch.bfloat16"}, name
        for r in launches[name]:
            assert r["exp"] == ([] if r["dtype"] == "torch.float32" else ["ex2.approx.f32"]), r
    assert len(launches["_conv_mish_kernel"]) == 2
    for r in launches["_conv_mish_kernel"]:
        assert r["wgmma"] > 0 and r["async_copy_sizes"] == ["0x10"], r
    # bn_mish's training passes: hints by default in the backward only; on, first pass evict_last, second
    # evict_first
    hints = ["L2::evict_first", "L2::evict_last"]
    for name, default in (("_train_forward_kernel", []), ("_train_backward_kernel", hints)):
        assert [r["l2_hints"] for r in launches[name]][::len(launches[name]) - 1] == [default, hints], name


if __name__ == "__main__":
    try:
        result = _report()
    except InternalsDiffer as exc:
        print(f"Triton's launch binder differs here: {exc}")
        sys.exit(3)
    print(json.dumps(result))
