#!/usr/bin/env bash
# Creates or completes the project's environment in .venv/ at the repository root.
# Idempotent: every step checks first and does nothing when its part is already in place.
# Sourced by tools/main.sh and tools/test.sh; can also be run alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=2.1.0
CACHE="${MMDCNV2_CACHE:-$HOME/.cache/mmdcnv2}"

say() { printf '[env] %s\n' "$*"; }
pipq() {
  local log; log=$(mktemp)
  if ! "$PY" -m pip install --disable-pip-version-check "$@" > "$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" | tail -n 30; rm -f "$log"; say "pip install $* failed"; exit 1
  fi
  rm -f "$log"
}

if [ ! -x "$PY" ]; then
  say "creating $VENV"
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi

have() { "$PY" - "$@" <<'PYEOF' >/dev/null 2>&1
import importlib.metadata as md, sys
for spec in sys.argv[1:]:
    name, _, ver = spec.partition("==")
    got = md.version(name)
    if ver and got.split("+")[0] != ver:
        raise SystemExit(1)
PYEOF
}

if ! have torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION; then
  say "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION (about a minute)"
  pipq torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION
fi

if ! have setuptools wheel ninja numpy pytest hypothesis mmengine==0.10.7 pycocotools matplotlib scipy onnx onnxruntime onnxscript ruff==0.14.14 clang-format==19.1.7; then
  say "installing build tools, mmengine, pycocotools, pytest, ruff, clang-format"
  pipq "setuptools>=77,<81" wheel ninja numpy pytest hypothesis mmengine==0.10.7 pycocotools matplotlib scipy onnx onnxruntime onnxscript ruff==0.14.14 clang-format==19.1.7
fi

# mmcv 2.1.0 has no wheel for this torch: build it from the sdist, with its CPU ops, once per torch version.
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" >/dev/null 2>&1; then
  WHEELS="$CACHE/wheels/torch-$TORCH_VERSION-py$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
  mkdir -p "$WHEELS"
  WHL=$(ls "$WHEELS"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$WHL" ]; then
    say "building mmcv $MMCV_VERSION with its ops from source against torch $TORCH_VERSION (about 7 minutes on 2 cores)"
    SRC=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation mmcv==$MMCV_VERSION -d "$SRC" 2>&1 | grep -v "is ignored" || true
    tar xzf "$SRC"/mmcv-$MMCV_VERSION.tar.gz -C "$SRC"
    # torch 2.14's headers need C++20; mmcv hard-codes older standards.
    sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$SRC/mmcv-$MMCV_VERSION/setup.py"
    if ! (cd "$SRC/mmcv-$MMCV_VERSION" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
          "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WHEELS" . > "$SRC/build.log" 2>&1); then
      tail -n 40 "$SRC/build.log"; say "building mmcv failed (log above)"; exit 1
    fi
    rm -rf "$SRC"
    WHL=$(ls "$WHEELS"/mmcv-$MMCV_VERSION-*.whl | head -n1)
  fi
  say "installing $(basename "$WHL")"
  pipq --no-deps --force-reinstall "$WHL"
  pipq addict packaging Pillow pyyaml yapf opencv-python-headless
  if ! "$PY" -c "import mmcv.ops" >/dev/null 2>&1; then
    say "the cached mmcv wheel does not import against this torch; rebuilding"
    rm -f "$WHL"; exec bash "${BASH_SOURCE[0]}"
  fi
fi

if ! have mmdet==3.3.0; then
  say "installing mmdet 3.3.0"
  pipq mmdet==3.3.0
fi

# openmim without opendatalab/openxlab, which would downgrade setuptools and requests.
if ! have openmim click colorama model-index pandas rich tabulate requests; then
  say "installing openmim (without its heavy optional dependencies)"
  pipq click colorama model-index pandas rich tabulate requests
  pipq --no-deps openmim
fi

# Our own extension: rebuilt only when its sources, the build script or torch changed.
STAMP_DIR="$VENV/.mmdcnv2"
mkdir -p "$STAMP_DIR"
STAMP=$( (cd "$ROOT" && cat setup.py $(find csrc -type f | sort) 2>/dev/null; echo "torch=$TORCH_VERSION force_cuda=${FORCE_CUDA:-0} arch=${TORCH_CUDA_ARCH_LIST:-} san=${MMDCNV2_SANITIZE:-0}") | sha256sum | cut -c1-32)
if [ "$(cat "$STAMP_DIR/build" 2>/dev/null)" != "$STAMP" ] || ! "$PY" -c "import mmdcnv2, torch; assert hasattr(torch.ops.mmdcnv2, 'deform_conv2d')" >/dev/null 2>&1; then
  say "building the mmdcnv2 extension (FORCE_CUDA=${FORCE_CUDA:-0})"
  LOG="$STAMP_DIR/build.log"
  if ! (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install --no-build-isolation --no-deps -e . > "$LOG" 2>&1); then
    tail -n 60 "$LOG"; say "building the extension failed (log above, full log in $LOG)"; exit 1
  fi
  "$PY" -c "import mmdcnv2, torch; assert hasattr(torch.ops.mmdcnv2, 'deform_conv2d')"
  echo "$STAMP" > "$STAMP_DIR/build"
fi
say "environment ready: $("$PY" -c 'import torch, mmcv, mmdet, mmengine; print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, mmengine {mmengine.__version__}")')"
