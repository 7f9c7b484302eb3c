"""``cspmirror check`` on tiny shapes, and the benchmark runner's ``--quick`` mode on the CPU."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from cspmirror import backends, cli
from cspmirror import ops as cspmirror_ops
from cspmirror.commands import check

REPO = Path(__file__).resolve().parents[1]


def test_check_reference_against_itself_passes(tmp_path, capsys):
    """The machinery on every case: the reference checked as a 'fast' backend passes, exit code 0."""
    out = tmp_path / "check.json"
    code = cli.main(["check", "--device", "cpu", "--backends", "reference", "--no-bench", "--json", str(out),
                     "--seed", "1"])
    text = capsys.readouterr().out
    assert code == 0, text
    data = json.loads(out.read_text())
    assert data["counts"]["FAIL"] == 0
    assert data["counts"]["PASS"] == len(data["results"]) > len(check.CHECKS)
    assert {r["direction"] for r in data["results"]} == {"fwd", "bwd"}
    assert "PASS" in text and "mirror_split" in text and "conv_bn_mish" in text


def test_check_fails_a_wrong_backend(monkeypatch, capsys):
    """A backend that returns slightly wrong numbers FAILs, exit code 1; one that raises
    NotImplementedError is a SKIP, not a failure."""
    real = cspmirror_ops.implementation

    def broken(op: str, backend: str, device: torch.device):
        fn = real(op, "reference", device)
        if backend != "extension":
            return real(op, backend, device)
        if op == "conv_bn_mish":
            raise NotImplementedError("no conv here")
        if op == "mirror_split":
            return lambda *a, **k: fn(*a, **k) * (1 + 1e-3)
        return fn

    monkeypatch.setattr(cspmirror_ops, "implementation", broken)
    monkeypatch.setattr(backends, "extension_status",
                        lambda: backends.BackendStatus("extension", True, "test double"))
    code = cli.main(["check", "--device", "cpu", "--backends", "extension", "--dtypes", "fp32", "--no-bench",
                     "--only", "mirror_split W"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out
    code = cli.main(["check", "--device", "cpu", "--backends", "extension", "--dtypes", "fp32", "--no-bench",
                     "--only", "conv_bn_mish 1x1"])
    text = capsys.readouterr().out
    assert code == 0 and "SKIP" in text and "no conv here" in text


def test_check_fails_an_available_backend_that_does_not_load(monkeypatch, capsys):
    """The extension is listed as available before its first build; a failed build is a FAIL (exit 1) whose
    reason is the compiler's error line, not the log's first 200 characters."""
    log = "Error building extension 'x':\n[1/3] c++ -MMD ... (long command)\nc++: error: unrecognized option '-fx'\n"

    def failing(backend: str) -> None:
        raise backends.BackendUnavailableError(f"the extension could not be loaded: {log}")

    monkeypatch.setattr(backends, "ensure_loaded", failing)
    code = cli.main(["check", "--device", "cpu", "--backends", "reference", "--dtypes", "fp32", "--no-bench",
                     "--only", "mirror_split W"])
    text = capsys.readouterr().out
    assert code == 1 and "did not load: c++: error: unrecognized option '-fx'" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "foo"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'foo'"),
    (["--device", "meta"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'meta'"),
    (["--device", "cuda:x"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--dtypes", "fp64"], "argument --dtypes"),
    (["--dtypes", ""], "argument --dtypes"),
    (["--backends", "tritn"], "argument --backends"),
    (["--only", "no such check"], "argument --only: no check matches"),
    (["--json", "."], "argument --json: '.' is a folder"),
    (["--seed", str(2**64)], f"argument --seed: {2**64} cannot seed a torch.Generator"),
])
def test_check_bad_arguments_are_usage_errors(args, message, capsys):
    """Before: tracebacks, or exit 0 having checked nothing."""
    assert cli.main(["check", "--no-bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_check_short_benchmark(capsys):
    code = cli.main(["check", "--device", "cpu", "--backends", "reference", "--dtypes", "fp32",
                     "--only", "mirror_fuse 2 parts"])
    text = capsys.readouterr().out
    assert code == 0
    assert "Short benchmark" in text and "reference ms" in text


def test_bench_quick_writes_every_format(tmp_path, monkeypatch):
    """``python -m bench --quick`` on the CPU: each suite (cut to one small case) writes JSON, then the
    combined JSON, CSV, markdown and PNG charts, naming the device and versions."""
    monkeypatch.syspath_prepend(str(REPO))
    pytest.importorskip("matplotlib")
    from bench import report, runner

    common = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--no-compile"]
    ops = ["--suite", "ops", "--only", "mirror_split", "--variants", "reference,copy"]
    assert runner.main([*ops, *common, "--no-report"]) == 0
    assert runner.main(["--suite", "models", "--only", "infer reference", *common, "--no-report"]) == 0
    assert not (tmp_path / "results.md").exists()
    assert runner.main(["--suite", "compare", "--only", "cspmirrornet_tiny", *common]) == 0
    for name in ("ops.json", "models.json", "compare.json", "results.json", "ops.csv", "models.csv",
                 "compare.csv", "results.md", "ops_roofline.png", "models.png", "compare.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    ops_rows = [r for r in results["ops"]["rows"] if r["status"] == "ok"]
    assert {r["variant"] for r in ops_rows} == {"reference", "copy"}
    assert all(r["gbps"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in ops_rows)
    model_rows = [r for r in results["models"]["rows"] if r["status"] == "ok"]
    assert model_rows and all(r["images_per_s"] > 0 for r in model_rows)
    (tiny,) = results["compare"]["rows"]
    assert tiny["status"] == "ok" and tiny["params_m"] > 0 and tiny["gmacs_256"] > 0 and tiny["act_mib"] > 0
    md = (tmp_path / "results.md").read_text()
    assert torch.__version__ in md and "cpu" in md
    with (tmp_path / "ops.csv").open() as f:  # every file names the device and versions, the CSVs too
        csv_rows = list(csv.DictReader(f))
    assert csv_rows and all(r["torch"] == torch.__version__ and r["device_name"] and r["date"] for r in csv_rows)
    # each layout of an op gets its own bars in the chart (they shared a position: one hid the other)
    layouts = [dict(op="mirror_split", direction="fwd", shape=f"8x64x32x32{cl}") for cl in ("", " channels_last")]
    assert len({report._bar_group(r) for r in layouts}) == 2


def test_bench_only_matching_no_case_keeps_the_results(tmp_path, monkeypatch):
    """Was: exit 0, having rewritten every suite's JSON (by default the committed bench/results/<device>/) with
    no rows, and the report with them."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench import runner

    old = {f"{suite}.json": json.dumps({"meta": {}, "rows": [{"suite": suite}]}) for suite in runner.RUNNERS}
    for name, text in old.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit, match="argument --only: no case of --suite all matches 'no such case'"):
        runner.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--no-compile",
                     "--only", "no such case"])
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == old


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "meta"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'meta'"),
    (["--device", "foo"], "argument --device"),
    (["--device", "cuda:-1"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'cuda:-1'"),
    (["--threads", "0"], "argument --threads"),
    (["--max-layers", "-1"], "argument --max-layers"),
    (["--budget", "-1"], "argument --budget"),
    (["--variants", "bogus"], "argument --variants: unknown ['bogus']"),
    (["--report-only", "--no-report"], "argument --no-report"),
])
def test_bench_bad_arguments_name_the_flag(args, message, tmp_path, monkeypatch):
    """Before: tracebacks, or results of nothing written over the old ones (meta: 'measured' nonsense)."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench import runner

    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        runner.main(["--quick", "--out", str(tmp_path), *args])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("cuda_devices", "device", "message"), [
    (0, "cuda", "argument --device: 'cuda' asked for CUDA, but no CUDA device is available"),
    (2, "cuda:2", "argument --device: 'cuda:2' asked for CUDA device 2, but this machine has 2 (cuda:0 to cuda:1)"),
])
def test_check_and_bench_refuse_a_cuda_device_not_here(cuda_devices, device, message, tmp_path, monkeypatch,
                                                       capsys):
    """Before: an index past the last CUDA device was taken (then failed deep in a run)."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench import runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    assert cli.main(["check", "--no-bench", "--device", device]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match=re.escape(message)):
        runner.main(["--quick", "--out", str(tmp_path), "--device", device])
    assert not any(tmp_path.iterdir())


def test_bench_checkpointed_training_keeps_fewer_activations(tmp_path, monkeypatch):
    """The models suite's gradient-checkpointing case: a row of its own (variant ``reference+ckpt``) that
    keeps fewer saved activations than the plain training step."""
    monkeypatch.syspath_prepend(str(REPO))
    pytest.importorskip("matplotlib")
    from bench import runner

    assert runner.main(["--suite", "models", "--only", "train reference", "--quick", "--device", "cpu", "--out",
                        str(tmp_path), "--no-progress", "--no-compile"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["models"]["rows"]
    plain, checkpointed = (next(r for r in rows if r["checkpointing"] is c and r["status"] == "ok")
                           for c in (False, True))
    assert 0 < checkpointed["act_mib"] < plain["act_mib"] / 2
    assert "| reference+ckpt |" in (tmp_path / "results.md").read_text()


def test_bn_groups_sweep_runs(tmp_path, monkeypatch):
    """``python -m bench.bn_groups`` (a GPU measurement) end to end on a tiny shape, timed eagerly under the
    interpreter: one row per layout, pass and variant (each budget; one group also walked in order and with
    the L2 hints), with the launches each makes; table and plot."""
    monkeypatch.syspath_prepend(str(REPO))
    pytest.importorskip("matplotlib")
    from helpers import triton_or_skip

    triton_or_skip()
    from bench import bn_groups, harness

    rows = bn_groups.measure((1, 3, 64, 64), torch.device("cpu"), repeats=1, budgets=[0, 64], programs_per_sm=(8,))
    assert len(rows) == 16 and all(r["graph_ms"] > 0 and r["frac_copy"] > 0 for r in rows)
    knobs = [(r["budget_bytes"], r["reversed"], r["hints"]) for r in rows[:4]]
    assert knobs == [(0, True, False), (64, True, False), (0, False, False), (0, True, True)]
    launches = {(r["layout"], r["direction"], r["budget_bytes"]): r["launches"] for r in rows}
    # NCHW: one channel per block, 3 groups of one under 64 bytes; NHWC: the 3 channels in one block
    assert launches[("nchw", "fwd", 0)] == 2 and launches[("nchw", "bwd", 64)] == 4
    assert launches[("nhwc", "bwd", 64)] == 2
    assert bn_groups.markdown(rows, harness.environment("cpu")).count("\n| nchw |") == 8
    bn_groups.plot(rows, tmp_path / "bn_groups.png")
    assert (tmp_path / "bn_groups.png").stat().st_size > 0


def test_kernel_breakdown_sweep_runs(tmp_path, monkeypatch):
    """``python -m bench.kernel_breakdown`` (a GPU measurement) end to end on tiny shapes with the reference
    backend and the profiler faked (it needs CUDA): a row per op, layout, direction and variant; the
    aggregation of profiler events per call (host-side events and those without device time left out); table
    and plot."""
    monkeypatch.syspath_prepend(str(REPO))
    pytest.importorskip("matplotlib")
    from types import SimpleNamespace

    from bench import harness, kernel_breakdown
    from bench.cases import Shapes

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def fake_profile(fn, calls):
        for _ in range(calls):
            fn()
        events = [SimpleNamespace(key="void stats_kernel<4>(float*)", count=2 * calls,
                                  self_device_time_total=30.0 * calls, device_type=cuda),
                  SimpleNamespace(key="Memset (Device)", count=calls, self_device_time_total=1.0 * calls,
                                  device_type=cuda),
                  SimpleNamespace(key="aten::add", count=calls, self_device_time_total=5.0, device_type=cpu),
                  SimpleNamespace(key="cudaLaunchKernel", count=calls, self_device_time_total=0.0, device_type=cuda)]
        return kernel_breakdown.kernel_times(events, calls)

    monkeypatch.setattr(kernel_breakdown, "profile", fake_profile)
    monkeypatch.setattr(kernel_breakdown, "VARIANTS", ("reference",))
    rows = kernel_breakdown.measure(Shapes((1, 2, 4, 8), (2, 3, 4, 4), "cspmirrornet53", 1, 32),
                                    torch.device("cpu"), calls=2)
    assert len(rows) == 2 * (2 + 2 + 2 + 1)  # layouts x (split, fuse, train: fwd + bwd; eval: fwd)
    for r in rows:
        assert [k["kernel"] for k in r["kernels"]] == ["void stats_kernel<4>(float*)", "Memset (Device)"]
        assert (r["total_us"], r["launches"], r["copy_us"]) == (31.0, 3.0, 31.0) and r["bytes"] > 0
    md = kernel_breakdown.markdown(rows, harness.environment("cpu"))
    assert md.count("\n| bn_mish_train | nhwc | bwd | reference | 31.0 | 100% | 3 | stats_kernel: 30.0 (2); "
                    "Memset: 1.0 (1) |") == 1
    kernel_breakdown.plot(rows, tmp_path / "kernel_breakdown.png")
    assert (tmp_path / "kernel_breakdown.png").stat().st_size > 0


def test_step_profile_runs(tmp_path, monkeypatch):
    """``python -m bench.step_profile`` end to end on the CPU (quick model; the CUDA profiler faked): the
    reference backend's step timed, its kernels sorted into kinds; the Triton one skipped with the reason
    (interpreter only here); table and plot."""
    monkeypatch.syspath_prepend(str(REPO))
    pytest.importorskip("matplotlib")
    from bench import harness, step_profile

    fake = [{"kernel": "void cudnn::wgrad_alg0_engine<float>(...)", "launches": 2.0, "us": 3000.0},
            {"kernel": "_train_backward_kernel", "launches": 4.0, "us": 1000.0},
            {"kernel": "void at::native::vectorized_elementwise_kernel<4>(...)", "launches": 9.0, "us": 500.0}]
    # PyTorch's kernels whose names end like Triton's go to PyTorch's kinds; cuDNN's batch norm is not a conv
    for pytorch_kernel in ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<>()",
                           "void at::native::(anonymous namespace)::mish_backward_kernel<float>()"):
        assert step_profile.kind_of(pytorch_kernel) == "other PyTorch"
    assert step_profile.kind_of("void at::native::batch_norm_backward_kernel<float>()") == \
        step_profile.kind_of("cudnn::bn_bw_1C11_kernel_new<float>") == "batch norm (PyTorch)"
    monkeypatch.setattr(step_profile, "device_kernels", lambda step, device: fake)
    rows = step_profile.measure(quick=True, device=torch.device("cpu"))
    reference, triton = rows
    assert reference["status"] == "ok" and reference["wall_ms"] >= reference["queue_ms"] > 0
    assert reference["device_ms"] == pytest.approx(4.5) and reference["launches"] == 15
    assert reference["kinds_ms"] == {"convolution": 3.0, "bn_mish (Triton)": 1.0, "other PyTorch": 0.5}
    assert triton["status"] == "skip" and "interpreter" in triton["reason"]
    md = step_profile.markdown(rows, harness.environment("cpu"))
    assert "| bn_mish (Triton) | 1.00 |" in md and "- cudnn::wgrad_alg0_engine: 3.00 (2)" in md
    step_profile.plot(rows, tmp_path / "step_profile.png")
    assert (tmp_path / "step_profile.png").stat().st_size > 0


def test_bench_tools_bad_arguments_name_the_flag(monkeypatch, capsys):
    """Were tracebacks (an empty median, a missing driver, KeyError '9') or an interpreter-less Triton error."""
    monkeypatch.syspath_prepend(str(REPO))
    pytest.importorskip("triton")
    from bench import diagnose_bn_mish, host_overhead

    with pytest.raises(SystemExit):
        host_overhead.main(["--rounds", "0"])
    assert "argument --rounds: expected an integer >= 1" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["diagnose_bn_mish", "--device", "cpu", "--parts", "9"])
    with pytest.raises(SystemExit):
        diagnose_bn_mish.main()
    assert "argument --parts: unknown part(s) ['9']" in capsys.readouterr().err


def test_host_overhead_runs(tmp_path, monkeypatch):
    """``python -m bench.host_overhead`` end to end on the CPU, launches stubbed (the interpreter's too):
    every case timed on both backends, each Triton case's launches counted (the bn_mish training passes: two
    each), the stubs undone afterwards."""
    monkeypatch.syspath_prepend(str(REPO))
    pytest.importorskip("triton")
    from triton.runtime.interpreter import GridExecutor
    from triton.runtime.jit import JITFunction

    from bench import host_overhead

    before = (JITFunction.run, GridExecutor.__call__, backends.triton_status)
    host_overhead.main(["--rounds", "2", "--out", str(tmp_path)])
    assert (JITFunction.run, GridExecutor.__call__, backends.triton_status) == before
    rows = json.loads((tmp_path / "host_overhead.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["reference_us"] > 0 and r["triton_us"] > 0 for r in rows)
    launches = {r["case"]: r["triton_launches"] for r in rows}
    assert launches["bn_mish train fwd (autograd)"] == launches["bn_mish train bwd"] == 2
    assert launches["bn_mish eval fwd (no_grad)"] == launches["mirror_split fwd (no_grad)"] == 1
    assert "| bn_mish train fwd (autograd) |" in (tmp_path / "host_overhead.md").read_text()


def test_mirror_tiles_sweep_runs(tmp_path, monkeypatch):
    """``python -m bench.mirror_tiles`` (a GPU measurement) end to end on a tiny shape under the interpreter,
    and each variant's tiling reaching the GPU launch plan (tile elements, warps)."""
    monkeypatch.syspath_prepend(str(REPO))
    pytest.importorskip("matplotlib")
    from helpers import triton_or_skip

    triton_or_skip()
    from cspmirror.kernels import mirror

    from bench import harness, mirror_tiles

    rows = mirror_tiles.measure((1, 2, 4, 8), torch.device("cpu"), repeats=1)
    assert len(rows) == 4 * len(mirror_tiles.VARIANTS) and all(r["graph_ms"] > 0 for r in rows)
    md = mirror_tiles.markdown(rows, harness.environment("cpu"))
    assert md.count("\n| nhwc |") == 2 * len(mirror_tiles.VARIANTS) and md.count("\n- nchw: ") == 1
    best = mirror_tiles.fastest(rows)
    for layout, (label, total, default) in best.items():
        sums = [sum(r["graph_ms"] for r in rows if r["layout"] == layout and r["variant"] == v)
                for v in mirror_tiles.VARIANTS]
        assert total == pytest.approx(min(sums)) and default == pytest.approx(sums[0])
        assert sums[list(mirror_tiles.VARIANTS).index(label)] == pytest.approx(total)
    mirror_tiles.plot(rows, tmp_path / "mirror_tiles.png")
    assert (tmp_path / "mirror_tiles.png").stat().st_size > 0
    monkeypatch.setattr(mirror, "triton_interpreted", lambda: False)
    for changes in mirror_tiles.VARIANTS.values():  # a bf16 NCHW split of [2, 64, 64, 64] along W, for a GPU
        with mirror_tiles.tiling_set(changes):
            tiling = mirror.TILINGS["along"]
            plan = mirror._plan(torch.empty(2, 64, 64, 64, dtype=torch.bfloat16),
                                torch.empty(4, 64, 64, 40, dtype=torch.bfloat16), 3, 2, 64, 40, False)
        assert tiling == mirror.TILINGS["along"]._replace(**changes)
        elements = tiling.tile_bytes // 2
        assert plan.blocks[0] * plan.blocks[1] * plan.blocks[2] == elements
        assert (plan.blocks[:2] == (1, 1)) == tiling.flat
        assert plan.num_warps == min(8, elements // (32 * tiling.per_thread))
        assert (plan.meta["FLAT"], plan.meta["FLIP"]) == (tiling.flat, tiling.flip_in_registers)
    x = torch.empty(2, 64, 64, 64, dtype=torch.bfloat16)  # the defaults: 8 KiB along W, 4 KiB across it
    for layout, elements in ((torch.contiguous_format, 4096), (torch.channels_last, 2048)):
        x, y = x.contiguous(memory_format=layout), torch.empty(4, 64, 64, 40, dtype=torch.bfloat16)
        plan = mirror._plan(x, y.contiguous(memory_format=layout), 3, 2, 64, 40, False)
        assert plan.blocks[0] * plan.blocks[1] * plan.blocks[2] == elements


def test_sweep_command_line(tmp_path, monkeypatch):
    """A GPU sweep's command line (``harness.sweep_main``) with CUDA faked: measures at the size asked for and
    writes the rows, the table and the plot; without CUDA it measures nothing."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench import harness

    asked = []

    def measure(quick, device):
        asked.append((quick, device.type))
        return [{"x": 1}]

    def plot(rows, path):
        path.write_text("png")

    args = ("a sweep", "demo", measure, lambda rows, env: f"| {env['device_slug']} | {len(rows)} |\n", plot)
    assert harness.sweep_main(["--out", str(tmp_path)], *args) == 0 and not asked  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(harness, "environment", lambda device: {"device_slug": "fake-gpu"})
    assert harness.sweep_main(["--out", str(tmp_path), "--quick"], *args) == 0
    assert asked == [(True, "cuda")]
    assert json.loads((tmp_path / "demo.json").read_text())["rows"] == [{"x": 1}]
    assert (tmp_path / "demo.md").read_text() == "| fake-gpu | 1 |\n" and (tmp_path / "demo.png").exists()


def test_report_targets_on_device_time(monkeypatch):
    """Rows that carry CUDA-graph device times get the same targets on them, beside the eager ones."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench import ops_suite, report

    def row(variant: str, eager_ms: float, graph_ms: float | None, op: str = "mirror_split",
            shape: str = "64x256x64x64", count: int = 1) -> dict:
        return {"suite": "ops", "op": op, "shape": shape, "direction": "fwd", "count_in_model": count,
                "variant": variant, "dtype": "bfloat16", "status": "ok", "median_ms": eager_ms,
                "p20_ms": eager_ms, "p80_ms": eager_ms, "graph_ms": graph_ms}

    rows = ops_suite.derive([row("copy", 0.10, 0.09), row("compile", 0.30, 0.20), row("triton", 0.40, 0.10)])
    targets = {(t["metric"], t["measured"]) for t in report.target_rows(rows)}
    assert ("of copy bandwidth", 0.25) in targets
    assert ("of copy bandwidth, device time (CUDA graph)", 0.9) in {(m, round(v, 6)) for m, v in targets}
    assert ("speed-up vs torch.compile, device time (CUDA graph)", 2.0) in targets
    assert "of copy bw (graph)" in report.markdown_table(rows, report.OPS_COLUMNS)
    # one target row per shape (the mirror ops are timed in both layouts)
    cl = "64x256x64x64 channels_last"
    rows += ops_suite.derive([row("copy", 0.10, 0.09, shape=cl), row("triton", 0.20, 0.10, shape=cl)])
    copy_fracs = {t["where"]: t["measured"] for t in report.target_rows(rows) if t["metric"] == "of copy bandwidth"}
    assert copy_fracs == {"64x256x64x64": 0.25, cl: 0.5}
    # conv layers: time-weighted over the layers (count in the model), device time where both have it
    conv = [row("eager_cbm", 1.0, 0.8, "conv_bn_mish", "a", 3), row("triton", 2.0, 0.4, "conv_bn_mish", "a", 3),
            row("eager_cbm", 1.0, None, "conv_bn_mish", "b"), row("triton", 1.0, 0.5, "conv_bn_mish", "b")]
    targets = {(t["metric"], t["where"]): t["measured"] for t in report.target_rows(ops_suite.derive(conv))}
    assert targets[("speed-up vs eager", "2 layers, time-weighted")] == (3 * 1.0 + 1.0) / (3 * 2.0 + 1.0)
    assert targets[("speed-up vs eager, device time (CUDA graph)", "1 layers, time-weighted")] == 2.0


def test_bench_time_limit_and_unreadable_check_json(tmp_path, monkeypatch):
    """A spent budget stops a case before it starts (it used to lift the limit); a check.json cut short by a
    timeout does not stop the GPU suite's summary."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench import harness, summary
    from bench.kernel_breakdown import short_kernel_name

    for spent in (0.0, -3.0):
        with pytest.raises(harness.CaseTimeout, match="budget"), harness.time_limit(spent):
            pytest.fail("ran past a spent budget")
    for unlimited in (float("inf"), 1e300):  # --budget 1e300 was an OverflowError from setitimer
        with harness.time_limit(unlimited):
            pass
    path = tmp_path / "check.json"
    path.write_text('{"counts": {"PA')
    assert "unreadable check.json" in summary.check_markdown(path)
    name = "void at::native::(anonymous namespace)::mish_backward_kernel<float>(float*)"
    assert short_kernel_name(name) == "at::native::mish_backward_kernel"
