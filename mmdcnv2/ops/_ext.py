"""Loads the compiled ops (``torch.ops.mmdcnv2``) and says clearly when they are missing."""

import torch

_BUILD_HINT = (
    "build them from the repository root with `pip install --no-build-isolation -e .` "
    "(or run `bash tools/test.sh`, which sets up everything)"
)

try:
    from mmdcnv2 import _C  # noqa: F401  (registers the ops with torch.library)

    _LOAD_ERROR = None
except ImportError as e:  # the extension was not built, or was built against another torch
    _LOAD_ERROR = e


def has_ops() -> bool:
    """Whether the compiled ops (``mmdcnv2._C``, registering ``torch.ops.mmdcnv2.*``) are loaded.

    False when the extension was not built or does not load (for example, built against another
    torch); then every op of :mod:`mmdcnv2.ops` raises a ``RuntimeError`` that says how to build it,
    while the pure-PyTorch references (:mod:`mmdcnv2.ops.reference`) still work. Never raises.
    """
    return _LOAD_ERROR is None


def has_cuda_kernels() -> bool:
    """Whether the compiled ops include CUDA kernels (built with CUDA, or with ``FORCE_CUDA=1`` where no GPU
    is visible). It says how mmdcnv2 was built, not whether a GPU is present: check
    ``torch.cuda.is_available()`` for that. Without CUDA kernels the ops refuse CUDA tensors with a
    ``RuntimeError``. False when the ops are not loaded; never raises.
    """
    return has_ops() and torch._C._dispatch_has_kernel_for_dispatch_key("mmdcnv2::deform_conv2d", "CUDA")


def assert_has_ops(*tensors: torch.Tensor) -> None:
    """Raises one clear RuntimeError when the ops (or their CUDA kernels) are missing."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(f"mmdcnv2's compiled ops are not available ({_LOAD_ERROR}); {_BUILD_HINT}.")
    if any(t is not None and t.device.type == "cuda" for t in tensors) and not has_cuda_kernels():
        raise RuntimeError(
            "mmdcnv2 was built without CUDA kernels, so its ops cannot run on a CUDA tensor; "
            "rebuild with `FORCE_CUDA=1 pip install --no-build-isolation -e .`."
        )


def _autocast_takes_device() -> bool:
    try:
        torch.is_autocast_enabled("cpu")
        return True
    except TypeError:
        return False


_AUTOCAST_TAKES_DEVICE = _autocast_takes_device()


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for device types without autocast (meta)."""
    if not _AUTOCAST_TAKES_DEVICE:  # torch < 2.4: one function per device (decided once: dynamo traces this)
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def check_like_input(op: str, input: torch.Tensor, **tensors) -> None:
    """For the fake kernels: every given tensor (None skipped) is on input's device with input's dtype."""
    for name, t in tensors.items():
        if t is None:
            continue
        torch._check_value(
            t.device == input.device, lambda: f"{op}: {name} is on {t.device} but input is on {input.device}"
        )
        torch._check_value(
            t.dtype == input.dtype, lambda: f"{op}: {name} has dtype {t.dtype} but input has dtype {input.dtype}"
        )


class column_budget:
    """Context manager: the column workspace of the deformable convolution, in bytes, for every
    call inside it (forward and backward, all devices; the column buffers of one call together, at
    least one row of them). ``0`` means each route's default: on the CPU 8 MiB with at least 2048 rows
    for the GEMM route, 16 MiB for the convolution route, and sizes measured once per shape for the
    tiled route (see :class:`cpu_route`; a set budget is used there for the forward's tiles and the
    backward's chunks alike), 256 MiB on CUDA, never more than 256 MiB. Smaller budgets mean more,
    smaller chunks (and GEMMs); results are the same up to floating-point rounding, and bit-identical on
    the tiled route. The tests use it to run many chunks on small inputs.

    The setting is process-wide (calls on other threads see it too), not thread-local; on exit the
    previous budget is restored, so the managers nest.

    Args:
        nbytes (int): the budget, >= 0.

    Raises:
        ValueError: ``nbytes`` < 0.
        RuntimeError: on entering, when the compiled ops are not loaded.

    Example::

        with column_budget(64 << 10):
            out = deform_conv2d(input, offset, weight)
    """

    def __init__(self, nbytes: int):
        if int(nbytes) < 0:
            raise ValueError(f"column_budget: nbytes must be >= 0, got {nbytes}")
        self.nbytes = int(nbytes)
        self._previous = None

    def __enter__(self):
        assert_has_ops()
        self._previous = torch.ops.mmdcnv2.set_column_budget(self.nbytes)
        return self

    def __exit__(self, *exc):
        torch.ops.mmdcnv2.set_column_budget(self._previous)
        return False


class cpu_route:
    """Context manager: the route of float32 deformable convolutions on the CPU inside it (float16 and
    bfloat16 inputs, computed in float32, included), forward and backward. For benchmarks and tests.

    Routes:

    - ``"auto"`` (the default): the tiled route where the processor has AVX2 and FMA (any x86-64 CPU of
      the last decade); elsewhere the convolution route up to 256 input channels where oneDNN is available
      and enabled (``torch.backends.mkldnn``) and the GEMM route above;
    - ``"tiled"``: an implicit GEMM with the package's own AVX-512 / AVX2 micro-kernels: tiles of sampled
      columns are multiplied while they are in the core's cache, with no vendor BLAS involved. Results
      are bit-identical whatever the number of threads; tile sizes are measured on the first call of a
      shape (the GEMM route where the processor lacks AVX2+FMA);
    - ``"gemm"``: MKL GEMMs over row-major columns (always the route of float64);
    - ``"conv"``: oneDNN convolutions over a channels-last column image for the forward and for
      grad_cols (the GEMM route where oneDNN is not available).

    The setting is process-wide (calls on other threads see it too) and read when each op runs; on exit
    the previous route is restored, so the managers nest. CUDA calls are not affected.

    Args:
        route (str): ``"auto"``, ``"tiled"``, ``"gemm"`` or ``"conv"``.

    Raises:
        ValueError: an unknown ``route``.
        RuntimeError: on entering, when the compiled ops are not loaded.
    """

    _ROUTES = {"auto": 0, "gemm": 1, "conv": 2, "tiled": 3}

    def __init__(self, route: str):
        if route not in self._ROUTES:
            raise ValueError(f"cpu_route: route must be one of {sorted(self._ROUTES)}, got {route!r}")
        self.route = route
        self._previous = None

    def __enter__(self):
        assert_has_ops()
        self._previous = torch.ops.mmdcnv2.set_cpu_route(self._ROUTES[self.route])
        return self

    def __exit__(self, *exc):
        torch.ops.mmdcnv2.set_cpu_route(self._previous)
        return False
