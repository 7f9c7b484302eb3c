#!/usr/bin/env bash
# The GPU suite: versions, the gpu-marked tests, `cspmirror check`, then the ops, models and compare
# benchmarks, then (with what time is left) the CPU tests' small grid on the GPU; every step time-bounded,
# everything bundled for the trip back from the GPU machine.
#
#   bench/gpu_suite.sh [OUTDIR]          # OUTDIR default: $OUT, else bench/results/gpu-run
#
# Assumes the repository was installed with `pip install --no-deps --no-build-isolation -e .` (it also
# works without: the repository goes on PYTHONPATH). Environment knobs:
#   GPU_SUITE_BUDGET=450     seconds for the whole suite (each step also has its own cap, below)
#   GPU_SUITE_DRY_RUN=1      the same steps on the CPU with --quick shapes, to shake out bugs without a GPU
#   GPU_SUITE_SKIP="a b"     steps not to run (env tests tests_models check tests_extension diagnose ops
#                            host_overhead bn_groups mirror_tiles step_profile models kernel_breakdown compare
#                            tests_on_device)
#   GPU_SUITE_K="expr"       only the gpu tests that pytest's -k EXPR selects (a follow-up run)
#   GPU_SUITE_ONLY=text      only the benchmark cases whose name contains text (python -m bench --only)
#   GPU_SUITE_VARIANTS=a,b   only these variants in the ops suite (python -m bench --variants)
#   PYTHON=python3           the interpreter that has torch
#
# OUTDIR receives at most 8 files, no folders: results.tar.gz (everything: logs, JSON, CSV, MD, PNG, the
# check's JSON, pytest's JUnit XML), summary.md, log.txt and the five PNG charts.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
OUTDIR="${1:-${OUT:-$REPO/bench/results/gpu-run}}"
DRY="${GPU_SUITE_DRY_RUN:-0}"
BUDGET="${GPU_SUITE_BUDGET:-450}"
RESERVE=30                       # seconds kept back for the report, the summary and the bundle
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then PY=$candidate; break; fi
  done
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/cspmirror-torch-extensions}"

WORK="$(mktemp -d /tmp/cspmirror-gpu-suite.XXXXXX)"
LOGS="$WORK/logs"; RES="$WORK/results"; STEPS="$WORK/steps.tsv"; LOG="$WORK/log.txt"
mkdir -p "$LOGS" "$RES" "$OUTDIR" "$TORCH_EXTENSIONS_DIR"
: > "$STEPS"
START=$(date +%s)

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; QUICK="--quick"
  INTERPRET="TRITON_INTERPRET=1 "  # for the steps that run Triton kernels on the CPU (not the timed suites)
else
  DEVICE=cuda; QUICK=""; INTERPRET=""
fi

# Step caps are sized for the default 450 s budget and scale with GPU_SUITE_BUDGET.
cap() { echo $(( $1 * BUDGET / 450 )); }

say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME CAP COMMAND: run COMMAND (a string; @BUDGET@ in it becomes the seconds the step may use, less a
# margin for writing its results) under `timeout`, for at most CAP seconds and what is left of the budget.
# Output goes to logs/NAME.log; its tail is copied into log.txt.
step() {
  local name=$1 cap=$2 cmd=$3
  if [[ " ${GPU_SUITE_SKIP:-} " == *" $name "* ]]; then
    say "SKIP  $name: GPU_SUITE_SKIP"
    printf '%s\tskipped (asked)\t0\t-\n' "$name" >> "$STEPS"
    return 0
  fi
  local left=$(( BUDGET - RESERVE - ($(date +%s) - START) ))
  local t=$(( cap < left ? cap : left ))
  if [ "$t" -lt 15 ]; then
    say "SKIP  $name: time budget spent"
    printf '%s\tskipped (budget)\t0\t-\n' "$name" >> "$STEPS"
    return 0
  fi
  cmd=${cmd//@BUDGET@/$(( t - 20 > 10 ? t - 20 : 10 ))}
  say "START $name (limit ${t}s)"
  local t0 rc
  t0=$(date +%s)
  echo "\$ $cmd" > "$LOGS/$name.log"
  timeout -k 10 "$t" bash -c "$cmd" >> "$LOGS/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  local state="ok"
  [ "$rc" -ne 0 ] && state="exit $rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && state="timed out"
  printf '%s\t%s\t%s\t%s\n' "$name" "$state" "$took" "$rc" >> "$STEPS"
  { echo "----- $name: last lines of logs/$name.log"; tail -n 60 "$LOGS/$name.log" | cut -c1-300; } >> "$LOG"
  say "END   $name: $state in ${took}s"
}

say "cspmirror GPU suite: repo $REPO, work $WORK, out $OUTDIR, budget ${BUDGET}s, dry run $DRY, python $PY"

cat > "$WORK/env.py" <<'EOF'
import importlib.metadata as md, platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| cudnn', torch.backends.cudnn.version())
for name in ('triton', 'timm', 'torchvision', 'pytest', 'pytest-benchmark', 'pytest-timeout', 'cspmirror'):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, 'absent')
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, '| SMs', p.multi_processor_count, '| memory GiB', round(p.total_memory / 2**30, 1))
else:
    print('no CUDA device')
from cspmirror import all_statuses
for s in all_statuses():
    print(' ', s)
EOF
step env "$(cap 40)" "(command -v nvidia-smi >/dev/null && nvidia-smi) || echo 'nvidia-smi: not found'; exec $PY $WORK/env.py"

# The extension's just-in-time build (nvcc: a minute or more) runs in the background while the tests that do
# not use the extension run; the check and the extension's tests run once it is over (a process that needs the
# extension during the build would wait on its lock). Nothing is timed before it is over.
cat > "$WORK/build.py" <<'EOF'
import time, torch
from cspmirror import backends, ops
t0 = time.time()
device = "cuda" if torch.cuda.is_available() else "cpu"
print("before:", backends.extension_status(), flush=True)
try:
    ops.mirror_split(torch.randn(2, 2, 2, 3, device=device), backend="extension")
    print(f"ready after {time.time() - t0:.0f} s:", backends.extension_status())
except Exception as exc:
    print(f"not usable after {time.time() - t0:.0f} s: {type(exc).__name__}: {exc}")
EOF
BUILD_CAP=$(( BUDGET / 3 ))
build_extension() {
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$BUILD_CAP" "$PY" "$WORK/build.py" > "$LOGS/build.log" 2>&1
  rc=$?
  # a build killed by its timeout leaves its lock file, on which every later build would wait forever
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null; fi
  echo "$rc $(( $(date +%s) - t0 ))" > "$WORK/build.rc"
}
say "START build (in the background, limit ${BUILD_CAP}s)"
build_extension &
BUILD_PID=$!

PYTEST_ANY="$PY -m pytest -v --tb=short tests/ -p no:cacheprovider --continue-on-collection-errors"
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ANY="$PYTEST_ANY --timeout=90"
PYTEST="$PYTEST_ANY -m gpu"
# Triton compiles are CPU-bound: spread the gpu tests over a few processes when pytest-xdist is there.
XDIST=""
[ "$DRY" != 1 ] && "$PY" -c "import xdist" 2>/dev/null && XDIST="-n 6"
# Each failure's report goes to failures.log as it happens (tests/conftest.py): a step stopped by its cap
# keeps the reasons pytest prints only at its end. The whole-model parity tests are the slowest: a step of
# their own, so that they cannot starve the kernels' tests.
export CSPMIRROR_FAILURE_LOG="$WORK/failures.log"
K="${GPU_SUITE_K:+ and ($GPU_SUITE_K)}"
step tests "$(cap 100)" "exec $PYTEST $XDIST -k 'not extension and not test_accelerate$K' --junitxml=$WORK/pytest-gpu.xml"
step tests_models "$(cap 90)" "exec $PYTEST $XDIST -k 'not extension and test_accelerate$K' --junitxml=$WORK/pytest-gpu-models.xml"

wait "$BUILD_PID"
read -r BUILD_RC BUILD_S < "$WORK/build.rc"
BUILD_STATE="ok"
[ "$BUILD_RC" -ne 0 ] && BUILD_STATE="exit $BUILD_RC"
printf 'build (background)\t%s\t%s\t%s\n' "$BUILD_STATE" "$BUILD_S" "$BUILD_RC" >> "$STEPS"
{ echo "----- build: logs/build.log"; tail -n 20 "$LOGS/build.log" | cut -c1-300; } >> "$LOG"
say "END   build: $BUILD_STATE in ${BUILD_S}s: $(tail -n 1 "$LOGS/build.log" | cut -c1-200)"
if ! grep -q "^ready" "$LOGS/build.log"; then
  export CSPMIRROR_BUILD_CUDA=0   # no second try at the CUDA build in every later step
  say "the extension's CUDA build is not usable: later steps build (at most) its CPU part"
fi

step check "$(cap 60)" "exec $PY -m cspmirror check --json $WORK/check.json"
step tests_extension "$(cap 35)" "exec $PYTEST -k extension --junitxml=$WORK/pytest-gpu-extension.xml"

step diagnose 90 "${INTERPRET}exec $PY -m bench.diagnose_bn_mish --device $DEVICE --out $RES/diagnose --parts 3"
# (quoted for the step's bash -c: case names hold spaces and '>')
SUITE="$PY -m bench --device $DEVICE $QUICK --out $RES --no-report --budget @BUDGET@${GPU_SUITE_ONLY:+ --only $(printf %q "$GPU_SUITE_ONLY")}"
step ops "$(cap 130)" "exec $SUITE --suite ops${GPU_SUITE_VARIANTS:+ --variants $(printf %q "$GPU_SUITE_VARIANTS")}"
step host_overhead "$(cap 30)" "exec $PY -m bench.host_overhead --device $DEVICE --rounds 200 --out $RES"
step bn_groups "$(cap 40)" "exec $PY -m bench.bn_groups --out $RES $QUICK"
step mirror_tiles "$(cap 60)" "exec $PY -m bench.mirror_tiles --out $RES $QUICK"
step step_profile "$(cap 60)" "exec $PY -m bench.step_profile --out $RES $QUICK"
step models "$(cap 60)" "exec $SUITE --suite models"
step kernel_breakdown "$(cap 30)" "exec $PY -m bench.kernel_breakdown --out $RES $QUICK"
step compare "$(cap 35)" "exec $SUITE --suite compare"
# Last, with what is left: the interpreter-sized grid of the CPU tests (small shapes, every dtype, layout and
# knob) on the GPU's real kernels.
step tests_on_device "$(cap 60)" "exec $PYTEST_ANY $XDIST -m 'on_device and not gpu' -k 'not extension and not test_accelerate$K' --junitxml=$WORK/pytest-on-device.xml"

# The report and the summary run in the reserve.
timeout -k 5 40 "$PY" -m bench --report-only --out "$RES" > "$LOGS/report.log" 2>&1 || say "report: exit $?"
timeout -k 5 20 "$PY" -m bench.summary --results "$RES" --check "$WORK/check.json" --steps "$STEPS" \
  --out "$WORK/summary.md" > "$LOGS/summary.log" 2>&1 || say "summary: exit $?"
say "suite done in $(( $(date +%s) - START ))s"

tar czf "$OUTDIR/results.tar.gz" -C "$WORK" .
cp "$WORK/summary.md" "$OUTDIR/" 2>/dev/null || echo "(no summary: see log.txt)" > "$OUTDIR/summary.md"
for f in ops_roofline.png models.png compare.png bn_groups.png mirror_tiles.png; do
  if [ -f "$RES/$f" ]; then cp "$RES/$f" "$OUTDIR/"; fi
done
cp "$LOG" "$OUTDIR/log.txt"

# What the caller sees: the summary, then the step table again (the end of stdout is what survives).
cat "$WORK/summary.md" 2>/dev/null
echo
cat "$RES/bn_groups.md" 2>/dev/null && echo
cat "$RES/mirror_tiles.md" 2>/dev/null && echo
cat "$RES/step_profile.md" 2>/dev/null && echo
cat "$RES/host_overhead.md" 2>/dev/null && echo
[ -s "$LOGS/diagnose.log" ] && { echo "== diagnose"; tail -n 80 "$LOGS/diagnose.log" | cut -c1-300; echo; }
[ -s "$WORK/failures.log" ] && { echo "== test failures (failures.log, last lines)"; tail -n 80 "$WORK/failures.log" | cut -c1-300; echo; }
echo "== steps (name, state, seconds, exit code) =="
cat "$STEPS"
echo "== files in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
