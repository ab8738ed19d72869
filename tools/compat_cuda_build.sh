#!/usr/bin/env bash
# Compiles our CUDA kernels (csrc/**/*.cu) as C++17 against the headers of the torch in the given Python's
# environment (tools/compat.sh passes .venv-oldest's: torch 2.1.2), with the machine's nvcc. Compile only:
# no GPU is needed, nothing is linked or loaded. torch's BuildExtension refuses an nvcc whose CUDA major
# version differs from torch's (13.0 here, 12.1 for torch 2.1.2; PyPI's nvidia-cuda-nvcc-cu12 wheels hold
# only ptxas, no nvcc), so nvcc is called directly with the flags BuildExtension would give it.
#   bash tools/compat_cuda_build.sh .venv-oldest/bin/python [arch, default 90]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$1"
ARCH="${2:-90}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
[ -n "$NVCC" ] || { echo "[compat-cuda] no nvcc on PATH (set NVCC=...)"; exit 1; }
CUDA_INC="$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include"
[ -f "$CUDA_INC/cuda_runtime.h" ] || CUDA_INC=$("$NVCC" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/.*TOP=\(.*\)/\1/p' | head -n1)/include
SP=$("$PY" -c "import site; print(site.getsitepackages()[0])")
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths(cuda=False)))")
# the CUDA libraries' headers that torch's CUDA headers include (cuBLAS, cuSPARSE, cuSOLVER), from torch's own pip packages
LIB_INC=""
for lib in cublas cusparse cusolver; do
  [ -d "$SP/nvidia/$lib/include" ] && LIB_INC="$LIB_INC -I$SP/nvidia/$lib/include"
done
STD=$("$PY" - <<'PYEOF'
import os
text = open(os.path.join(os.path.dirname(__import__("torch").__file__), "include", "ATen", "ATen.h")).read()
print("c++20" if "202002L" in text else "c++17")
PYEOF
)
[ "$STD" = "c++17" ] || { echo "[compat-cuda] this torch's headers require C++20; nothing to check in C++17 mode"; exit 1; }
OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT
echo "[compat-cuda]   $("$NVCC" --version | tail -n 2 | head -n 1), -std=$STD, sm_$ARCH, torch $("$PY" -c 'import torch; print(torch.__version__)') headers"
for cu in $(cd "$ROOT" && find csrc -name '*.cu' | sort); do
  t0=$SECONDS
  "$NVCC" -std=$STD -c "$ROOT/$cu" -o "$OUT/$(basename "$cu").o" $TORCH_INC -I"$CUDA_INC" $LIB_INC -I"$ROOT/csrc" \
    -DMMDCNV2_WITH_CUDA -D_GLIBCXX_USE_CXX11_ABI=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))') \
    -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -O3 -gencode arch=compute_$ARCH,code=sm_$ARCH \
    -Xcompiler -fPIC 2>&1 | grep -v "^$" || true
  [ -s "$OUT/$(basename "$cu").o" ] || { echo "[compat-cuda] $cu did not compile"; exit 1; }
  echo "[compat-cuda]   $cu: compiled in $((SECONDS - t0)) s"
done
