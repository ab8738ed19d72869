#!/usr/bin/env bash
# Builds the extension's CPU code with AddressSanitizer and UndefinedBehaviorSanitizer
# (MMDCNV2_SANITIZE=1 in setup.py) into a separate folder, and runs the op tests against that build.
# The installed mmdcnv2/_C*.so is left alone.
#
#   bash tools/sanitize.sh [pytest arguments]      (default: tests/ops)
#
# MMDCNV2_SAN_DIR picks the build folder (default: a new one under /tmp); MAX_JOBS the build's jobs.
# The tests run from a copy of the Python package that holds the sanitized library, put first on the
# path; libasan is preloaded (python itself is not instrumented), leak detection is off (CPython and
# torch keep their allocations until exit). Every sanitizer report goes to $DIR/reports/; the script
# fails when pytest fails or when any report was written.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
DIR="${MMDCNV2_SAN_DIR:-$(mktemp -d /tmp/mmdcnv2-sanitize.XXXXXX)}"
mkdir -p "$DIR/reports"
rm -f "$DIR"/reports/*

echo "[sanitize] building with ASan + UBSan into $DIR (CPU code only)"
# CUDA off: no FORCE_CUDA, and no visible device, so setup.py builds the CPU extension only.
if ! (cd "$ROOT" && env -u FORCE_CUDA CUDA_VISIBLE_DEVICES= MMDCNV2_SANITIZE=1 MAX_JOBS="${MAX_JOBS:-2}" \
      "$PY" setup.py build_ext --build-lib "$DIR/lib" --build-temp "$DIR/tmp" > "$DIR/build.log" 2>&1); then
  tail -n 40 "$DIR/build.log"; echo "[sanitize] build failed (log: $DIR/build.log)"; exit 1
fi
SO=$(ls "$DIR"/lib/mmdcnv2/_C*.so)

# a copy of the package with the sanitized library in it
rm -rf "$DIR/pkg" && mkdir -p "$DIR/pkg"
(cd "$ROOT" && find mmdcnv2 -name '*.py' -exec cp --parents {} "$DIR/pkg/" \;)
cp "$SO" "$DIR/pkg/mmdcnv2/"

LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
[ -f "$LIBASAN" ] || { echo "[sanitize] libasan.so not found (gcc -print-file-name)"; exit 1; }
ldd "$DIR/pkg/mmdcnv2/$(basename "$SO")" | grep -q asan || { echo "[sanitize] the build is not instrumented"; exit 1; }

# pytest runs from the package copy: test paths given relative to the repository root are made absolute
ARGS=()
for a in "$@"; do
  if [[ "$a" != /* && -e "$ROOT/${a%%::*}" ]]; then ARGS+=("$ROOT/$a"); else ARGS+=("$a"); fi
done
[ ${#ARGS[@]} -eq 0 ] && ARGS=("$ROOT/tests/ops")
echo "[sanitize] running pytest ${ARGS[*]} against $SO"
set +e
(cd "$DIR/pkg" &&
  export PYTHONPATH="$DIR/pkg" LD_PRELOAD="$LIBASAN $LIBUBSAN" \
    ASAN_OPTIONS="detect_leaks=0:log_path=$DIR/reports/asan:halt_on_error=1:abort_on_error=1" \
    UBSAN_OPTIONS="print_stacktrace=1:log_path=$DIR/reports/ubsan:halt_on_error=0" \
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}" &&
  "$PY" -c "import mmdcnv2, sys; assert mmdcnv2.__file__.startswith('$DIR/pkg'), mmdcnv2.__file__" &&
  "$PY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" "${ARGS[@]}")
RC=$?
set -e
if ls "$DIR"/reports/* > /dev/null 2>&1; then
  echo "[sanitize] sanitizer reports:"; head -n 60 "$DIR"/reports/*
  echo "[sanitize] FAILED: reports in $DIR/reports"; exit 1
fi
[ $RC -eq 0 ] || { echo "[sanitize] pytest failed (exit $RC)"; exit $RC; }
echo "[sanitize] clean: no ASan/UBSan report, tests passed ($DIR)"
