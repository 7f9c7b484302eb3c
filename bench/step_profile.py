"""Where a training step's time goes: the host or the GPU, and which kernels (GPU only).

The models suite's eager training step (forward, cross-entropy, backward, SGD step; bf16 autocast; on a GPU
cspmirrornet53 at batch 64, 256x256) on the reference and the Triton backend, side by side. Per backend:

- wall: the step's time, synchronized, median over steps;
- queue: how long the host takes to return from the step, its Python path and kernel launches (the GPU keeps
  running after); close to wall when the host is the bottleneck, also when the launch queue fills up;
- device: the step's kernel time under ``torch.profiler`` (CUDA activity), and its share of wall ("busy"):
  well under 100% means the GPU waits on the host;
- the device time by kind of kernel (convolution, the fused Triton ops, other PyTorch ops) and the longest
  kernels.

    python -m bench.step_profile [--out DIR] [--quick]

Writes ``step_profile.json``, ``.md`` and ``.png`` into ``DIR`` (default ``bench/results/<device>``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from bench import harness
from bench.kernel_breakdown import short_kernel_name
from bench.models_suite import ModelCase, backend_skip, builder, plan_for
from bench.training import train_step_fn
from cspmirror import get_model

BACKENDS = ("reference", "triton")
# kind of Triton kernel -> the kernels' exact names (PyTorch's own kernels share their suffixes:
# multi_tensor_apply_kernel, batch_norm_backward_kernel)
TRITON_KINDS: dict[str, frozenset[str]] = {
    "bn_mish (Triton)": frozenset({"_train_forward_kernel", "_train_backward_kernel", "_apply_kernel",
                                   "_backward_kernel", "_running_kernel"}),
    "mirror (Triton)": frozenset({"mirror_split_kernel", "mirror_fuse_kernel"}),
    "conv_bn_mish (Triton)": frozenset({"_conv_mish_kernel", "_mish_epilogue_kernel"}),
}
# kind of other kernel -> substrings of its name (lower case); the first kind that matches wins (batch norm
# before convolution: cuDNN's batch-norm kernels are named cudnn::bn_*)
KINDS: dict[str, tuple[str, ...]] = {
    "batch norm (PyTorch)": ("batch_norm", "::bn_"),
    "convolution": ("conv", "xmma", "cudnn", "gemm", "wgrad", "dgrad", "cutlass", "sm90_"),
    "copies": ("memcpy", "memset", "copy"),
}
OTHER = "other PyTorch"
ALL_KINDS = (*TRITON_KINDS, *KINDS, OTHER)  # in the tables' and the plot's order


def kind_of(kernel: str) -> str:
    exact = kernel.strip()
    triton_kind = next((kind for kind, names in TRITON_KINDS.items() if exact in names), None)
    if triton_kind is not None:
        return triton_kind
    name = kernel.lower()
    return next((kind for kind, keys in KINDS.items() if any(k in name for k in keys)), OTHER)


def profile_step(backend: str, quick: bool, device: torch.device, steps: int) -> dict:
    """One backend's row (see the module doc)."""
    plan = plan_for(device, quick, (torch.bfloat16,) if device.type == "cuda" else (torch.float32,))
    dtype = plan.dtypes[0]
    case = ModelCase(plan.model, "train", backend, False, dtype, plan.batches[("train", dtype)], plan.resolution)
    row = {"backend": backend, "model": case.model, "batch": case.batch, "resolution": case.resolution,
           "dtype": str(dtype).removeprefix("torch.")}
    reason = backend_skip(backend, device)
    if reason:
        return {**row, "status": "skip", "reason": reason}
    torch.manual_seed(0)
    model = builder(case, get_model(case.model), device)()
    x = torch.randn(case.batch, 3, case.resolution, case.resolution, device=device)
    target = torch.randint(0, 1000, (case.batch,), device=device)
    step = train_step_fn(model, x, target, device, dtype)
    for _ in range(3):  # compiles the kernels, fills the allocator's cache
        step()
    harness.sync(device)
    queue, wall = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        harness.sync(device)
        queue.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    row.update(status="ok", wall_ms=statistics.median(wall), queue_ms=statistics.median(queue))
    kernels = device_kernels(step, device)
    if kernels is not None:
        row["device_ms"] = sum(k["us"] for k in kernels) / 1e3
        row["busy"] = row["device_ms"] / row["wall_ms"]
        row["launches"] = sum(k["launches"] for k in kernels)
        by_kind: dict[str, float] = {}
        for k in kernels:
            by_kind[kind_of(k["kernel"])] = by_kind.get(kind_of(k["kernel"]), 0.0) + k["us"] / 1e3
        row["kinds_ms"] = by_kind
        row["top"] = kernels[:12]
    return row


def device_kernels(step, device: torch.device) -> list[dict] | None:
    """The kernels of one call of ``step`` (:func:`bench.kernel_breakdown.kernel_times`), None off CUDA."""
    if device.type != "cuda":
        return None
    from bench.kernel_breakdown import profile

    return profile(step, calls=3)


def measure(quick: bool, device: torch.device) -> list[dict]:
    return [profile_step(backend, quick, device, steps=3 if quick else 10) for backend in BACKENDS]


def markdown(rows: list[dict], env: dict) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    first = rows[0]
    lines = harness.sweep_header(
        "A training step, host and device", env,
        f"{first['model']}, batch {first['batch']}, {first['resolution']}x{first['resolution']}, "
        f"{first['dtype']}, eager: forward, cross-entropy, backward, SGD step. wall: synchronized step, median; "
        "queue: until the step returns (host path and launches); device: the kernels' time under torch.profiler; "
        "busy: device / wall.") + [
        "| backend | wall ms | queue ms | device ms | busy | launches |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | — | — | — | — | {r['reason']} |")
            continue
        device = f"{r['device_ms']:.1f} | {r['busy']:.0%} | {r['launches']:.0f}" if "device_ms" in r else "— | — | —"
        lines.append(f"| {r['backend']} | {r['wall_ms']:.1f} | {r['queue_ms']:.1f} | {device} |")
    profiled = [r for r in ok if "kinds_ms" in r]
    if profiled:
        kinds = ALL_KINDS
        lines += ["", "Device time by kind of kernel, ms per step:", "",
                  "| kind | " + " | ".join(r["backend"] for r in profiled) + " |",
                  "|---|" + "---:|" * len(profiled)]
        for kind in kinds:
            lines.append(f"| {kind} | " + " | ".join(f"{r['kinds_ms'].get(kind, 0.0):.2f}" for r in profiled) + " |")
        for r in profiled:
            lines += ["", f"Longest kernels, {r['backend']} (ms per step, launches):", ""]
            lines += [f"- {short_kernel_name(k['kernel'], 70)}: {k['us'] / 1e3:.2f} ({k['launches']:g})"
                      for k in r["top"]]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Per backend: the device time stacked by kind of kernel, beside the wall and queue times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colours = matplotlib.colormaps["tab10"]
    for i, r in enumerate(ok):
        bottom = 0.0
        for j, kind in enumerate(ALL_KINDS):
            ms = r.get("kinds_ms", {}).get(kind, 0.0)
            ax.bar(3 * i, ms, bottom=bottom, color=colours(j), label=kind if i == 0 else None)
            bottom += ms
        ax.bar(3 * i + 1, r["wall_ms"], color="0.35", label="wall" if i == 0 else None)
        ax.bar(3 * i + 1.8, r["queue_ms"], width=0.6, color="0.7", label="queue" if i == 0 else None)
    ax.set_xticks([3 * i + 0.9 for i in range(len(ok))], [r["backend"] for r in ok])
    ax.set_ylabel("ms per training step")
    ax.set_title(f"{rows[0]['model']} training step: device time by kind vs wall")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return harness.sweep_main(argv, __doc__.split("\n\n")[0], "step_profile", measure, markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())
