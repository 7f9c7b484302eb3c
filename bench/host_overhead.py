"""Host-side cost per call of the fused ops: what a call costs its caller's thread, kernels aside.

For small and mid-sized tensors on a GPU an eager op's time is its Python path (validation, dispatch,
launch plans, allocations, autograd bookkeeping) and its kernel launches, not its kernels: the CUDA-event
timings of the ops suite include it, because the GPU idles until the last kernel is queued. Two modes:

- ``--device cpu`` (any machine, the default): Triton kernel launches are replaced by a no-op that records
  them (no GPU, no interpreter), the Triton backend is declared available, and the ops run on tiny CPU
  tensors. The reference backend runs its real PyTorch ops on the same tensors as the yardstick. Not
  included: Triton's own launch path (argument binding, the kernel-cache look-up, ``cuLaunchKernel``); the
  table counts launches so that it can be added.
- ``--device cuda`` (a GPU): real launches on tiny CUDA tensors, each call timed until it returns, without
  synchronising (the GPU runs the tiny kernels faster than the host queues them): everything the host does,
  Triton's and the driver's launch paths included.

Each op runs eagerly, with autograd recording (as in training) or under ``no_grad``. Candidates are timed
interleaved, round after round; medians in microseconds.

Run as ``python -m bench.host_overhead [--device cuda] [--out DIR]``. Writes ``host_overhead.json`` and
``host_overhead.md`` under ``DIR`` (default ``bench/results/<device type>``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from triton.runtime.jit import JITFunction

from bench.harness import environment
from bench.runner import resolve_device
from cspmirror.train.cli_args import positive_int

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (2, 16, 8, 8)
LAUNCHES: list[str] = []


def _launch_points() -> list[tuple[type, str]]:
    """The methods that launch a Triton kernel: a compiled one's ``JITFunction.run``, and an interpreted one's
    ``GridExecutor.__call__`` (TRITON_INTERPRET=1; every Triton version's interpreter launches through it,
    not all through ``InterpretedFunction.run``). Each one's ``self.fn`` is the kernel's Python function."""
    points: list[tuple[type, str]] = [(JITFunction, "run")]
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import GridExecutor

        points.append((GridExecutor, "__call__"))
    return points


@contextlib.contextmanager
def _recording_launches(stub: bool) -> Iterator[None]:
    """Within: every Triton launch appends its kernel's name to LAUNCHES; with ``stub`` it does nothing else,
    the Triton backend counts as available and the reductions plan for a 132-SM GPU (an H100)."""
    from cspmirror.kernels import bn_mish

    from cspmirror import backends

    def recording(original: Callable) -> Callable:
        def launch(self, *args, **kwargs):
            LAUNCHES.append(self.fn.__name__)
            return None if stub else original(self, *args, **kwargs)
        return launch

    saved = [(cls, name, getattr(cls, name)) for cls, name in _launch_points()]
    if stub:
        saved += [(backends, "triton_status", backends.triton_status),
                  (bn_mish, "target_programs", bn_mish.target_programs)]
        backends.triton_status = lambda device=None: backends.BackendStatus("triton", True, "launches stubbed")
        bn_mish.target_programs = lambda device: bn_mish.PROGRAMS_PER_SM * 132
    for cls, name in _launch_points():
        setattr(cls, name, recording(getattr(cls, name)))
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _cases(device: torch.device) -> dict[str, Callable[[str], Callable[[], object]]]:
    """Per case: backend -> the call to time (everything it needs is built once, outside the timing)."""
    from cspmirror import ops

    n, c, h, w = SHAPE
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    weight = torch.nn.Parameter(torch.rand(c, device=device) + 0.5)  # as in a model
    bias = torch.nn.Parameter(torch.randn(c, device=device))
    running = (torch.zeros(c, device=device), torch.ones(c, device=device))
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

    cases = {
        "mirror_split fwd (autograd)": lambda b: lambda: split(b),
        "mirror_split fwd (no_grad)": lambda b: lambda: split(b, grad=False),
        "mirror_split bwd": backward(split, [x]),
        "mirror_fuse fwd (autograd)": lambda b: lambda: fuse(b),
        "mirror_fuse bwd": backward(fuse, parts),
        "bn_mish train fwd (autograd)": lambda b: lambda: bn_train(b),
        # Own running statistics: the reference's graph saves them, and other forwards update them in place.
        "bn_mish train bwd": backward(lambda b: bn_train(b, tuple(t.clone() for t in running)), [x, weight, bias]),
        "bn_mish eval fwd (no_grad)": lambda b: lambda: bn_eval(b),
    }
    if device.type == "cuda":  # the conv's autotuner and its path choice time kernels on first use: a GPU only
        conv_x = x.detach().contiguous(memory_format=torch.channels_last)
        conv_w = torch.randn(c, c, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
        conv_b = torch.randn(c, device=device)
        cases["conv_bn_mish 3x3 (inference)"] = lambda b: lambda: ops.conv_bn_mish(conv_x, conv_w, conv_b,
                                                                                   backend=b)
    return cases


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


def _stubbed(device: torch.device) -> bool:
    """Whether launches are stubbed on ``device``: everywhere but on CUDA, where they are real."""
    return device.type != "cuda"


def measure(rounds: int, device: torch.device) -> list[dict]:
    """Per case: the reference's and the Triton backend's host microseconds per call (medians), and the
    Triton launches of one call. Launches are stubbed off CUDA, real on CUDA (see the module docstring)."""
    stub = _stubbed(device)
    rows = []
    with _recording_launches(stub=True) if stub else contextlib.nullcontext():
        for case, make in _cases(device).items():
            calls = {backend: make(backend) for backend in ("reference", "triton")}
            calls["triton"]()  # first use: on a GPU the conv times its paths and autotunes (launches not counted)
            LAUNCHES.clear()
            with contextlib.nullcontext() if stub else _recording_launches(stub=False):
                calls["triton"]()
            launches = len(LAUNCHES)
            times = _interleaved(calls, rounds)
            rows.append({"case": case, "reference_us": times["reference"], "triton_us": times["triton"],
                         "triton_launches": launches})
            print(f"{case:30s} reference {times['reference']:7.1f} us   triton {times['triton']:7.1f} us "
                  f"({launches} launches)", flush=True)
    return rows


def write(rows: list[dict], out: Path, rounds: int, device: torch.device) -> None:
    env = environment(device)
    stub = _stubbed(device)
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "shape": list(SHAPE), "rounds": rounds, "torch_threads": torch.get_num_threads(),
              "launches": "stubbed" if stub else "real", "rows": rows}
    (out / "host_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    mode = ("Triton launches stubbed" if stub else
            "real launches, each call timed until it returns, not synchronised")
    what = ("everything but the kernels and Triton's own launch path (binding, cache look-up, driver launch), "
            "which comes on top per launch on a GPU host" if stub else
            "everything the host does per call, Triton's and the driver's launch paths included")
    lines = [
        f"# Host-side cost per call ({mode}; see bench/host_overhead.py)",
        "",
        f"- {env['device_name']}{'' if stub else ' (host CPU: ' + env['cpu'] + ')'}; torch {env['torch']}; "
        f"triton {env.get('triton', '?')}; "
        f"Python {env['python']}; {env['date']}",
        f"- tensors {list(SHAPE)} fp32 on {device.type}; medians of {rounds} interleaved rounds; the machine may "
        "be shared, so compare within a run.",
        f"- triton: {what}. Launches: Triton kernels only (not PyTorch's, such as a fill).",
        "",
        "| case | reference us | triton us | triton launches |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['case']} | {r['reference_us']:.1f} | {r['triton_us']:.1f} | {r['triton_launches']} |"
              for r in rows]
    (out / "host_overhead.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'host_overhead.json'} and host_overhead.md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=300)
    parser.add_argument("--device", default="cpu", help="cpu (launches stubbed) or cuda (real launches)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<device type>")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    write(measure(args.rounds, device), args.out or RESULTS / device.type, args.rounds, device)


if __name__ == "__main__":
    main()
