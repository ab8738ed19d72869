#!/usr/bin/env bash
# The oldest supported environment, as an mmdetection user has it, and mmdcnv2 tested in it.
#
#   bash tools/compat.sh            build (or reuse) .venv-oldest/, install mmdcnv2 into it, run the checks
#   bash tools/compat.sh --setup    only build the environment and install mmdcnv2
#   bash tools/compat.sh --newest   the same at the other end: .venv-newest/, Python 3.13 + torch 2.14.1,
#                                   tests/ops only (no mmcv or mmdet there; not run by CI)
#
# .venv-oldest/: Python 3.8, torch 2.1.2 + torchvision 0.16.2 (a CUDA 12.1 build), numpy < 2,
# mmengine 0.10.7, mmcv 2.1.0 (built from its sdist against that torch, unmodified, wheel cached in
# ~/.cache/mmdcnv2 as tools/env.sh does), mmdet 3.3.0, pycocotools. mmdcnv2 goes in the way a user
# installs it into an environment they already have: `pip install --no-build-isolation .`, keeping
# their torch. The checks: the ops and models tests (tests/ops, tests/models), one short `mim train`
# and `mim test` of a shapes config, and (unless COMPAT_CUDA=0, where nvcc is on PATH)
# our CUDA kernels compiled as C++17 against torch 2.1.2's headers with the machine's nvcc (compile only;
# PyPI's CUDA 12 nvcc wheels carry no nvcc, see tools/compat_cuda_build.sh).
# Every step prints how long it took.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SETUP_ONLY=0
NEWEST=0
for arg in "$@"; do
  case "$arg" in
    --setup) SETUP_ONLY=1 ;;
    --newest) NEWEST=1 ;;
    *) echo "usage: bash tools/compat.sh [--setup] [--newest]"; exit 2 ;;
  esac
done
if [ "$NEWEST" = 1 ]; then
  # the other end: the newest supported Python with the pinned torch (ops only: no mmcv build for it)
  VENV="$ROOT/.venv-newest"; PY_VERSION=3.13; TORCH_VERSION=2.14.1; TORCHVISION_VERSION=0.29.1; NUMPY="numpy"
else
  VENV="$ROOT/.venv-oldest"; PY_VERSION=3.8; TORCH_VERSION=2.1.2; TORCHVISION_VERSION=0.16.2; NUMPY="numpy<2"
fi
PY="$VENV/bin/python"
MMCV_VERSION=2.1.0
CACHE="${MMDCNV2_CACHE:-$HOME/.cache/mmdcnv2}"

say() { printf '[compat] %s\n' "$*"; }
T0=$SECONDS
step_start() { STEP_T0=$SECONDS; say "$*"; }
step_done() { say "  done in $((SECONDS - STEP_T0)) s"; }
# shellcheck source=tools/env_lib.sh
source "$ROOT/tools/env_lib.sh"

find_python() {
  # pyenv's installs first: on PATH, python3.8 may be a pyenv shim that refuses when 3.8 is not selected
  local cand
  for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/$PY_VERSION.*/bin/python$PY_VERSION \
              "$(command -v python$PY_VERSION 2>/dev/null || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$PY_VERSION'.split('.')))" 2>/dev/null; then
      echo "$cand"; return
    fi
  done
  say "no Python $PY_VERSION found (looked under ${PYENV_ROOT:-$HOME/.pyenv}/versions and on PATH)"; exit 1
}

# --- the environment ---------------------------------------------------------------------------
if [ ! -x "$PY" ]; then
  step_start "creating $VENV with Python $PY_VERSION"
  "$(find_python)" -m venv "$VENV"
  step_done
fi

if ! have torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION; then
  need_disk 8 "$VENV" "installing torch $TORCH_VERSION and mmcv into $VENV"
  step_start "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION (a CUDA build: several GB, a few minutes)"
  pipq torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION "$NUMPY"
  step_done
fi

if [ "$NEWEST" = 1 ]; then
  if ! have wheel ninja pytest hypothesis scipy; then
    step_start "installing build tools and pytest"
    pipq "$NUMPY" "setuptools>=77,<81" wheel ninja pytest hypothesis scipy
    step_done
  fi
elif ! have wheel ninja pytest hypothesis mmengine==0.10.7 pycocotools scipy \
   || ! "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)"; then
  step_start "installing build tools, mmengine, pycocotools, pytest"
  pipq "$NUMPY" "setuptools>=64" wheel ninja pytest hypothesis mmengine==0.10.7 pycocotools scipy matplotlib
  step_done
fi

if [ "$NEWEST" = 0 ] && ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" >/dev/null 2>&1; then
  step_start "mmcv $MMCV_VERSION against torch $TORCH_VERSION (its sdist unmodified; about 15 minutes on 2 cores when not cached)"
  install_mmcv "$MMCV_VERSION" "$TORCH_VERSION" "$CACHE" "" "opencv-python-headless<4.11"
  step_done
fi

if [ "$NEWEST" = 0 ] && ! have mmdet==3.3.0; then
  step_start "installing mmdet 3.3.0 and openmim"
  pipq mmdet==3.3.0
  pipq click colorama model-index pandas rich tabulate requests
  pipq --no-deps openmim
  step_done
fi

# --- mmdcnv2, as a user installs it ------------------------------------------------------------
# A copy of the tree (no build/ or .venv*/ of the main environment leak in), installed non-editable.
step_start "pip install --no-build-isolation . (CPU ops) into $VENV"
SRC_COPY=$(mktemp -d)
trap 'rm -rf "$SRC_COPY"' EXIT
# what git tracks or would track (no venvs, builds, work dirs); symbolic links stay links
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar xf - -C "$SRC_COPY")
LOG="$VENV/mmdcnv2-install.log"
if ! (cd "$SRC_COPY" && FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install --disable-pip-version-check \
      --no-build-isolation --force-reinstall --no-deps . > "$LOG" 2>&1); then
  tail -n 60 "$LOG"; say "installing mmdcnv2 failed (log above, full log in $LOG)"; exit 1
fi
# the user's torch is untouched, the package is the installed copy (not this checkout)
(cd /tmp && "$PY" - "$TORCH_VERSION" <<'PYEOF'
import importlib.util, sys, platform, torch, mmdcnv2
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert "site-packages" in mmdcnv2.__file__, mmdcnv2.__file__
assert mmdcnv2.ops.has_ops()
stack = ""
if importlib.util.find_spec("mmdet"):
    import mmcv, mmdet
    stack = f", mmcv {mmcv.__version__}, mmdet {mmdet.__version__}"
print(f"[compat]   Python {platform.python_version()}, torch {torch.__version__}{stack}, "
      f"mmdcnv2 {mmdcnv2.__version__} from {mmdcnv2.__file__}")
PYEOF
)
step_done
[ "$SETUP_ONLY" = 1 ] && { say "environment ready in $((SECONDS - T0)) s"; exit 0; }

# The checks run in the copy, without its mmdcnv2/ package: every import of mmdcnv2 (pytest, the tests'
# subprocesses, tools/) finds the installed one, never this checkout's (whose extension, if built, is for
# the main environment's torch).
rm -rf "$SRC_COPY/mmdcnv2" "$SRC_COPY/build" "$SRC_COPY"/*.egg-info

# --- the checks --------------------------------------------------------------------------------
if [ "$NEWEST" = 1 ]; then
  step_start "tests/ops on Python $PY_VERSION, torch $TORCH_VERSION"
  (cd "$SRC_COPY" && "$VENV/bin/pytest" -q -ra -p no:cacheprovider tests/ops)
  step_done
  say "all checks passed in $((SECONDS - T0)) s"
  exit 0
fi

step_start "tests/ops and tests/models on torch $TORCH_VERSION"
(cd "$SRC_COPY" && "$VENV/bin/pytest" -q -ra -p no:cacheprovider tests/ops tests/models)
step_done

step_start "a short mim train and mim test of a shapes config"
WORK=$(mktemp -d)
(cd "$WORK" && "$PY" "$SRC_COPY/tools/make_shapes.py" --out "$WORK/data" --num-train 16 --num-val 8 --size 128 > /dev/null)
CONFIG=shapes/faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py  # found in the installed package's .mim/configs
OPTS=()
for loader in train_dataloader val_dataloader test_dataloader; do
  OPTS+=("$loader.dataset.data_root=$WORK/data/" "$loader.num_workers=0" "$loader.persistent_workers=False")
done
OPTS+=("val_evaluator.ann_file=$WORK/data/annotations/val.json" "test_evaluator.ann_file=$WORK/data/annotations/val.json"
       train_cfg.max_iters=6 train_cfg.val_interval=6 default_hooks.checkpoint.interval=6 default_hooks.logger.interval=2)
(cd "$WORK" && "$PY" -m mim train mmdcnv2 "$CONFIG" --gpus 0 --work-dir "$WORK/train" --cfg-options "${OPTS[@]}" \
   > "$WORK/train.log" 2>&1) || { tail -n 40 "$WORK/train.log"; say "mim train failed"; exit 1; }
grep -q "Iter(train) \[6/6\]" "$WORK/train.log" || { tail -n 40 "$WORK/train.log"; say "mim train did not reach iteration 6"; exit 1; }
(cd "$WORK" && "$PY" -m mim test mmdcnv2 "$CONFIG" --checkpoint "$WORK/train/iter_6.pth" --gpus 0 --work-dir "$WORK/test" \
   --cfg-options "${OPTS[@]}" > "$WORK/test.log" 2>&1) || { tail -n 40 "$WORK/test.log"; say "mim test failed"; exit 1; }
grep -o "coco/bbox_mAP: [0-9.]*" "$WORK/test.log" | tail -n1 | sed 's/^/[compat]   /' || { tail -n 40 "$WORK/test.log"; say "mim test gave no COCO metric"; exit 1; }
rm -rf "$WORK"
step_done

# --- our CUDA kernels as C++17 (compile only: no GPU here) ------------------------------------------
if [ "${COMPAT_CUDA:-1}" = 1 ] && command -v nvcc >/dev/null; then
  step_start "CUDA kernels compiled as C++17 against torch $TORCH_VERSION's headers (compile only)"
  bash "$ROOT/tools/compat_cuda_build.sh" "$PY"
  step_done
fi
say "all checks passed in $((SECONDS - T0)) s"
