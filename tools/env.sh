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
# shellcheck source=tools/env_lib.sh
source "$ROOT/tools/env_lib.sh"

if [ ! -x "$PY" ]; then
  say "creating $VENV"
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi

if ! have torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION; then
  need_disk 9 "$VENV" "installing torch $TORCH_VERSION, mmcv, mmdet and the build into $VENV"
  say "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION (about a minute)"
  pipq torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION
fi

if ! have setuptools wheel ninja numpy pytest hypothesis mmengine==0.10.7 pycocotools matplotlib scipy onnx onnxruntime onnxscript ruff==0.14.14 clang-format==19.1.7; then
  say "installing build tools, mmengine, pycocotools, pytest, ruff, clang-format"
  pipq "setuptools>=77,<81" wheel ninja numpy pytest hypothesis mmengine==0.10.7 pycocotools matplotlib scipy onnx onnxruntime onnxscript ruff==0.14.14 clang-format==19.1.7
fi

# mmcv 2.1.0 has no wheel for this torch: built from the sdist, with its CPU ops, once per torch version
# (torch 2.14's headers need C++20; mmcv hard-codes older standards).
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" >/dev/null 2>&1; then
  install_mmcv "$MMCV_VERSION" "$TORCH_VERSION" "$CACHE" c++20 opencv-python-headless
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
