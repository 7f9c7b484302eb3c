"""pytest-benchmark microbenchmarks of the fused ops, driven by the same case table as ``python -m bench``.

    pytest bench/ --benchmark-only                      # every case x direction x variant
    pytest bench/ --benchmark-only -k "mirror and triton"

``pytest`` alone never collects this folder (``testpaths = ["tests"]``). On the CPU the shapes are the
``--quick`` ones and Triton is skipped (it runs there only in its interpreter, which is not timed).
"""

from __future__ import annotations

import pytest
import torch

from bench import harness
from bench.cases import op_cases, shapes_for
from bench.variants import NotTimed, prepare, variants_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = op_cases(shapes_for(DEVICE, quick=DEVICE.type != "cuda"), max_layers=4 if DEVICE.type == "cuda" else 2,
                 compile_layers=1)
PARAMS = [
    pytest.param(case, direction, variant, id=f"{case.name}-{direction}-{variant}")
    for case in CASES
    for direction in case.directions
    for variant in ["copy", *variants_for(case.op, DEVICE)]
    if variant != "compile" or case.compile_baseline
]


@pytest.mark.parametrize(("case", "direction", "variant"), PARAMS)
def test_op(benchmark, case, direction, variant):
    if DEVICE.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch._dynamo.reset()
    work = case.build(DEVICE, DTYPE)
    nbytes = work.fwd_bytes if direction == "fwd" else work.bwd_bytes
    if variant == "copy":
        fn = harness.copy_fn(nbytes, DEVICE)
    else:
        try:
            fn = prepare(work, direction, variant, DEVICE, case.op, trains="bwd" in case.directions)
            fn()
        except NotTimed as exc:
            pytest.skip(str(exc))
        except Exception as exc:
            reason = harness.skip_reason(exc)
            if reason:
                pytest.skip(reason)
            raise

    def timed() -> None:
        fn()
        harness.sync(DEVICE)

    benchmark.extra_info.update(bytes=nbytes, flops=work.flops if direction == "fwd" else 0.0,
                                device=harness.device_name(DEVICE), dtype=str(DTYPE))
    benchmark(timed)
    if benchmark.stats is not None:  # None under --benchmark-disable (each case runs once, untimed)
        benchmark.extra_info["gbps"] = harness.gbps(nbytes, benchmark.stats.stats.median * 1e3)
