"""Host-side cost per call of the fused ops: what a call costs before any of its kernels runs.

For small and mid-sized tensors on a GPU an eager op's time is its Python path (validation, dispatch,
launch plans, allocations, autograd bookkeeping), not its kernels: the CUDA-event timings of the ops suite
include it, because the GPU idles until the last kernel is queued. This script measures that path on any
machine: Triton kernel launches are replaced by a no-op that records them (no GPU, no interpreter), the
Triton backend is declared available, and the ops run on tiny CPU tensors in eager mode, with autograd
recording (as in training) or under ``no_grad``. The reference backend runs its real PyTorch ops on the same
tensors as the yardstick. Candidates are timed interleaved, round after round; medians in microseconds.

Not included: the Triton driver's own launch cost (argument binding, the kernel-cache look-up,
``cuLaunchKernel``, typically 5-20 us per launch on a GPU host); the table counts launches so it can be added.

Run as ``python -m bench.host_overhead`` (``--out`` for another folder). Writes ``host_overhead.json`` and
``host_overhead.md`` under ``bench/results/cpu``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from triton.runtime.jit import JITFunction

from bench.harness import environment

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
SHAPE = (2, 16, 8, 8)
LAUNCHES: list[str] = []


def _stub_triton() -> None:
    """Launches record their kernel's name and return; the Triton backend counts as available; the
    reductions plan for a 132-SM GPU (an H100)."""
    from cspmirror.kernels import bn_mish

    from cspmirror import backends

    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: LAUNCHES.append(self.__name__)
    backends.triton_status = lambda device=None: backends.BackendStatus("triton", True, "launches stubbed")
    bn_mish.target_programs = lambda device: bn_mish.PROGRAMS_PER_SM * 132


def _cases() -> dict[str, Callable[[str], Callable[[], object]]]:
    """Per case: backend -> the call to time (everything it needs is built once, outside the timing)."""
    from cspmirror import ops

    n, c, h, w = SHAPE
    x = torch.randn(SHAPE, requires_grad=True)
    weight, bias = torch.nn.Parameter(torch.rand(c) + 0.5), torch.nn.Parameter(torch.randn(c))  # as in a model
    running = (torch.zeros(c), torch.ones(c))
    y = ops.mirror_split(x.detach())
    parts = [y[:, : c // 2].clone().requires_grad_(), y[:, c // 2:].clone().requires_grad_()]

    def split(backend: str, grad: bool = True) -> torch.Tensor:
        return ops.mirror_split(x if grad else x.detach(), backend=backend)

    def fuse(backend: str) -> torch.Tensor:
        return ops.mirror_fuse(parts, w, backend=backend)

    def bn_train(backend: str, stats: tuple[torch.Tensor, torch.Tensor] = running) -> torch.Tensor:
        return ops.bn_mish(x, weight, bias, *stats, True, backend=backend)

    def bn_eval(backend: str) -> torch.Tensor:
        return ops.bn_mish(x.detach(), weight.detach(), bias.detach(), *running, False, backend=backend)

    def backward(forward: Callable[[str], torch.Tensor], inputs: list[torch.Tensor]):
        def make(backend: str) -> Callable[[], object]:
            out = forward(backend)
            grad = torch.randn_like(out)
            return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)
        return make

    return {
        "mirror_split fwd (autograd)": lambda b: lambda: split(b),
        "mirror_split fwd (no_grad)": lambda b: lambda: split(b, grad=False),
        "mirror_split bwd": backward(split, [x]),
        "mirror_fuse fwd (autograd)": lambda b: lambda: fuse(b),
        "mirror_fuse bwd": backward(fuse, parts),
        "bn_mish train fwd (autograd)": lambda b: lambda: bn_train(b),
        # Own running statistics: the reference's graph saves them, and other forwards update them in place.
        "bn_mish train bwd": backward(lambda b: bn_train(b, (torch.zeros(c), torch.ones(c))), [x, weight, bias]),
        "bn_mish eval fwd (no_grad)": lambda b: lambda: bn_eval(b),
    }


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median microseconds of each function, timed in alternation (reverse order every other round)."""
    for fn in fns.values():
        for _ in range(20):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(rounds):
        for name, fn in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(rounds: int) -> list[dict]:
    _stub_triton()
    rows = []
    for case, make in _cases().items():
        calls = {backend: make(backend) for backend in ("reference", "triton")}
        LAUNCHES.clear()
        calls["triton"]()
        launches = len(LAUNCHES)
        times = _interleaved(calls, rounds)
        rows.append({"case": case, "reference_us": times["reference"], "triton_us": times["triton"],
                     "triton_launches": launches})
        print(f"{case:30s} reference {times['reference']:7.1f} us   triton {times['triton']:7.1f} us "
              f"({launches} launches)", flush=True)
    return rows


def write(rows: list[dict], out: Path, rounds: int) -> None:
    env = environment("cpu")
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "shape": list(SHAPE), "rounds": rounds, "torch_threads": torch.get_num_threads(),
              "rows": rows}
    (out / "host_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Host-side cost per call (Triton launches stubbed; see bench/host_overhead.py)",
        "",
        f"- CPU: {env['device_name']}; torch {env['torch']}; triton {env.get('triton', '?')}; "
        f"Python {env['python']}; {env['date']}",
        f"- tensors {list(SHAPE)} fp32 on the CPU; medians of {rounds} interleaved rounds; the machine may be "
        "shared, so compare within a run.",
        "- triton: everything but the kernels and the driver's launch (add ~5-20 us per launch on a GPU host).",
        "",
        "| case | reference us | triton us | triton launches |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['case']} | {r['reference_us']:.1f} | {r['triton_us']:.1f} | {r['triton_launches']} |"
              for r in rows]
    (out / "host_overhead.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'host_overhead.json'} and host_overhead.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    write(measure(args.rounds), args.out, args.rounds)


if __name__ == "__main__":
    main()
