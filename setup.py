"""Builds mmdcnv2 and its compiled ops (mmdcnv2._C) against the installed torch.

CUDA kernels are built when CUDA is usable or FORCE_CUDA=1; the architectures
come from TORCH_CUDA_ARCH_LIST (default: a portable list with 8.0 and 9.0).
MMDCNV2_SANITIZE=1 builds the CPU code with AddressSanitizer and UBSan.
The sources are C++17: they are compiled as C++17, or as C++20 where the installed
torch's headers require it (MMDCNV2_CXX_STD=c++17 or c++20 overrides the choice).
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

import setuptools
from setuptools import setup

# pyproject.toml's [project] table (name, version, packages, package data) needs setuptools >= 64; an older
# one (Python 3.8's venv ships 56) would build a package named UNKNOWN holding only the extension.
if int(setuptools.__version__.split(".")[0]) < 64:
    sys.exit(
        f"mmdcnv2 needs setuptools >= 64 to build (found {setuptools.__version__}): "
        "pip install -U 'setuptools>=64', then install mmdcnv2 again"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;9.0;10.0;12.0+PTX"


def _find_cuda_home():
    """The CUDA toolkit folder (the one holding include/cuda_runtime.h), or None.

    torch's own guess can land one folder above the toolkit, and nvcc on PATH may
    be a wrapper script, so ask nvcc itself where its toolkit is.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.cu")
        open(probe, "w").close()
        run = subprocess.run([nvcc, "--dryrun", "-c", probe], capture_output=True, text=True, cwd=tmp)
    for line in (run.stdout + run.stderr).splitlines():
        if "TOP=" in line:
            candidates.insert(0, os.path.normpath(line.split("TOP=", 1)[1].strip()))
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
import torch.utils.cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if not _cuda_home:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit found: put nvcc on PATH or set CUDA_HOME")
        return True
    return torch.cuda.is_available() and _cuda_home is not None


def _nvidia_include_dirs():
    # pip's CUDA runtime packages keep headers such as cusparse.h outside the toolkit.
    dirs = []
    for path in sys.path:
        dirs += glob.glob(os.path.join(path, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _torch_header(*parts):
    for inc in torch.utils.cpp_extension.include_paths():
        path = os.path.join(inc, *parts)
        if os.path.isfile(path):
            with open(path) as f:
                return f.read()
    return ""


def cxx_standard():
    """Our sources are C++17; torch's own headers demand C++20 from some release on (ATen/ATen.h says so)."""
    return "c++20" if "202002L" in _torch_header("ATen", "ATen.h") else "c++17"


def feature_macros():
    """What the installed torch's headers offer that older ones lack (read off the headers, not the version)."""
    macros = []
    if "mm_dtype" in _torch_header("ATen", "ops", "mm.h"):  # at::mm(a, b, out_dtype)
        macros.append(("MMDCNV2_HAS_MM_DTYPE", None))
    return macros


def limited_api():
    """(Py_LIMITED_API value, wheel tag): the stable ABI of Python 3.8, or the one a newer torch's
    BuildExtension imposes itself (``min_supported_cpython``, 3.10 for torch 2.14)."""
    hexcode = getattr(torch.utils.cpp_extension, "min_supported_cpython", None) or "0x03080000"
    value = int(hexcode, 16)
    return hexcode, f"cp{value >> 24}{(value >> 16) & 0xFF}"


def openmp_flags():
    """(compile, link) flags for OpenMP where torch's intra-op parallelism is OpenMP (its Linux builds):
    at::parallel_for is a header template whose ``#pragma omp parallel`` is compiled into our own code, so
    without -fopenmp every parallel loop of our CPU kernels would run on one thread. We link the libgomp
    that torch ships where it has one (torch/lib/libgomp*.so*, named libgomp.so.1 in torch 2.14 and
    libgomp-<hash>.so.1 in torch 2.1), so that the process keeps one OpenMP runtime with torch's thread
    count; elsewhere the compiler's own. MMDCNV2_NO_OPENMP=1 builds without."""
    if os.environ.get("MMDCNV2_NO_OPENMP", "0") == "1":
        return [], []
    if "OpenMP" not in torch.__config__.parallel_info() or not torch.backends.openmp.is_available():
        return [], []
    bundled = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    return ["-fopenmp"], (bundled[:1] if bundled else ["-fopenmp"])


def make_extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    std = "-std=" + os.environ.get("MMDCNV2_CXX_STD", cxx_standard())
    omp_cxx, omp_ld = openmp_flags()
    cxx = ["-O3", std, "-fopenmp-simd", "-fvisibility=hidden"] + omp_cxx
    ldflags = list(omp_ld)
    if os.environ.get("MMDCNV2_SANITIZE", "0") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
        cxx = [f for f in cxx if f != "-O3"] + san
        ldflags += ["-fsanitize=address,undefined"]
    kwargs = dict(
        name="mmdcnv2._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=ldflags,
        define_macros=[("Py_LIMITED_API", limited_api()[0])] + feature_macros(),
        py_limited_api=True,
    )
    if not with_cuda:
        return CppExtension(**kwargs)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    kwargs["sources"] += sorted(glob.glob("csrc/**/*.cu", recursive=True))
    kwargs["include_dirs"] += _nvidia_include_dirs()
    kwargs["extra_compile_args"]["nvcc"] = ["-O3", std, "--expt-relaxed-constexpr", "-lineinfo"]
    kwargs["define_macros"].append(("MMDCNV2_WITH_CUDA", None))
    return CUDAExtension(**kwargs)


# Metadata and packages live in pyproject.toml.
setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": limited_api()[1]}},
)
