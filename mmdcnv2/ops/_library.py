"""Registrations of our compiled ops with torch, from torch 2.1 on.

The op schemas are defined once, in C++ (``TORCH_LIBRARY(mmdcnv2, ...)``). What torch adds around
them depends on the release:

- torch >= 2.4 (``torch.library.register_fake`` / ``register_autograd``) and >= 2.5
  (``register_autocast``): the official registrations. Fake kernels make ``torch.compile``,
  ``torch.export``, ``opcheck`` and the dynamo ONNX exporter work.
- older torch (2.1 to 2.3): autograd and autocast are Python kernels registered under the ``Autograd``
  and ``AutocastCPU`` / ``AutocastCUDA`` dispatch keys, so eager mode works as on a new torch (any caller
  of ``torch.ops.mmdcnv2.*`` gets them). There are no fake kernels: a ``Meta`` kernel raises a
  ``RuntimeError`` naming the torch release needed, so tracing with fake tensors fails with that message
  instead of a wrong result.

Which features the installed torch has is decided by what ``torch.library`` offers, not by its version
string; the version in messages is the release that introduced the API.
"""

from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = [
    "HAS_FAKE_KERNELS",
    "TORCH_VERSION",
    "register_fake",
    "register_autograd",
    "register_autocast",
    "require",
    "torch_version",
]


def torch_version() -> Tuple[int, int]:
    """(major, minor) of the installed torch."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


TORCH_VERSION = torch_version()
HAS_FAKE_KERNELS = hasattr(torch.library, "register_fake")
_HAS_REGISTER_AUTOGRAD = hasattr(torch.library, "register_autograd")
_HAS_REGISTER_AUTOCAST = hasattr(torch.library, "register_autocast")

# The release that introduced each API (and with it the feature named in our messages).
FAKE_KERNELS_NEED = "2.4"

_LIB: Optional["torch.library.Library"] = None


def _lib() -> "torch.library.Library":
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("mmdcnv2", "IMPL")
    return _LIB


def require(feature: str, need: str = FAKE_KERNELS_NEED) -> None:
    """Raises a RuntimeError naming ``feature`` and the torch release it needs when the installed torch
    is older (judged by the torch.library API the feature rests on)."""
    if not HAS_FAKE_KERNELS:
        raise RuntimeError(
            f"mmdcnv2: {feature} needs torch >= {need} (fake kernels through "
            f"torch.library.register_fake); this is torch {torch.__version__}. "
            "Eager mode (autograd, autocast, float16/bfloat16) works on this torch."
        )


def register_fake(qualname: str) -> Callable[[Callable], Callable]:
    """``@torch.library.register_fake(qualname)`` where torch has it; elsewhere a Meta kernel that raises
    (torch.compile, torch.export and FakeTensorMode reach the op through it)."""

    def decorate(fn: Callable) -> Callable:
        if HAS_FAKE_KERNELS:
            return torch.library.register_fake(qualname)(fn)
        name = qualname.split("::", 1)[1]

        def needs_newer_torch(*args, **kwargs):
            require(
                f"{qualname} on fake or meta tensors (torch.compile, torch.export, opcheck, the dynamo ONNX exporter)"
            )

        _lib().impl(name, needs_newer_torch, "Meta")
        return fn

    return decorate


def register_autograd(qualname: str, backward: Callable, setup_context: Callable) -> None:
    """``torch.library.register_autograd`` where torch has it; elsewhere an ``autograd.Function`` registered
    as the op's Autograd kernel (the forward runs below autograd, ``setup_context`` and ``backward`` are the
    same functions)."""
    if _HAS_REGISTER_AUTOGRAD:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        return
    namespace, name = qualname.split("::", 1)
    op = getattr(getattr(torch.ops, namespace), name).default

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                out = op(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Function.__name__ = Function.__qualname__ = f"{name}_autograd"

    def autograd_kernel(*args):
        return Function.apply(*args)

    _lib().impl(name, autograd_kernel, "Autograd")


def register_autocast(qualname: str, device_type: str, cast_to: torch.dtype) -> None:
    """``torch.library.register_autocast`` where torch has it; elsewhere a kernel under the device's
    Autocast key that casts every floating tensor argument but float64 ones to ``cast_to`` and runs the op
    with autocast off (as the official registration does)."""
    if _HAS_REGISTER_AUTOCAST:
        torch.library.register_autocast(qualname, device_type, cast_to)
        return
    namespace, name = qualname.split("::", 1)
    op = getattr(getattr(torch.ops, namespace), name).default

    def cast(a):  # autocast's rule: floating tensors other than float64
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64:
            return a.to(cast_to)
        return a

    def autocast_kernel(*args: Sequence):
        with torch.autocast(device_type, enabled=False):
            return op(*[cast(a) for a in args])

    _lib().impl(name, autocast_kernel, "AutocastCPU" if device_type == "cpu" else "AutocastCUDA")
