#!/usr/bin/env bash
# One command that proves the CUDA kernels on a machine with a GPU:
#
#   bash tools/gpu_check.sh [OUTPUT_DIR]
#
# Needs only torch (2.11 or later) with its CUDA toolkit (nvcc), pytest and hypothesis: no mmcv,
# mmdet or network. Steps, each with its own time limit, each logged:
#   1. build the extension in place for this GPU's architecture only (FORCE_CUDA=1);
#   2. tools/gpu_smoke.py: every op forward and backward on the GPU, in float64/32/16 and bfloat16,
#      against the same kernels' host emulation;
#   3. pytest -m gpu tests/ops;
#   4. compute-sanitizer --tool memcheck (then racecheck) on tools/gpu_smoke.py --quick;
#   5. python tools/benchmark.py --device cuda --quick --no-detector.
# Writes everything into OUTPUT_DIR (default: $OUT if set, else results/gpu_check/<time>), with
# summary.txt, and names the folder at the end. Exits non-zero if any step failed, and at once,
# with a message, where there is no GPU. Aimed at < 8 minutes on a 16-core machine with one H100.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$ROOT/.venv/bin/python"
DEST="${1:-${OUT:+$OUT/gpu_check}}"
DEST="${DEST:-$ROOT/results/gpu_check/$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$DEST"
SUMMARY="$DEST/summary.txt"
: > "$SUMMARY"
say() { printf '[gpu_check] %s\n' "$*" | tee -a "$SUMMARY"; }
FAILED=0

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "no CUDA device visible to torch ($PY): this check needs a GPU; nothing was run"
  exit 2
fi

cd "$ROOT"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  nvcc --version 2>&1 | tail -n 2
  nproc
} > "$DEST/environment.txt" 2>&1
say "$(grep -m1 '^device' "$DEST/environment.txt")"

# step NAME SECONDS COMMAND...: runs it with a time limit, logs to $DEST/NAME.log, records the result
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  say "$name: running (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$DEST/$name.log" 2>&1
  local rc=$?
  local dt=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then
    say "$name: PASSED in ${dt}s"
  else
    [ $rc -eq 124 ] && say "$name: TIMED OUT after ${dt}s" || say "$name: FAILED (exit $rc) in ${dt}s"
    tail -n 25 "$DEST/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    FAILED=1
  fi
  return $rc
}

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
if ! step build 240 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
      "$PY" setup.py build_ext --inplace; then
  say "the build failed: nothing else can run. Logs in $DEST"
  exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import mmdcnv2, torch; assert mmdcnv2.ops.has_cuda_kernels()" >> "$DEST/build.log" 2>&1 \
  || { say "build: the extension has no CUDA kernels"; exit 1; }

step smoke 90 "$PY" tools/gpu_smoke.py
step pytest_gpu 150 "$PY" -m pytest -q -ra -m gpu tests/ops -p no:cacheprovider --junitxml="$DEST/pytest_gpu.xml"
if command -v compute-sanitizer > /dev/null; then
  step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" tools/gpu_smoke.py --quick
  step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 3 "$PY" tools/gpu_smoke.py --quick
else
  say "compute-sanitizer not found: memcheck and racecheck skipped"
fi
step benchmark 120 "$PY" tools/benchmark.py --device cuda --quick --no-detector --out "$DEST/bench"

if [ $FAILED -eq 0 ]; then say "all steps passed"; else say "some steps FAILED (above)"; fi
say "results in $DEST"
exit $FAILED
