"""ONNX export of models that use mmdcnv2's ops.

Deformable convolution (v1 and v2, every stride, padding, dilation, group and deform
group, with or without bias) maps to the standard ONNX ``DeformConv`` operator (opset 19
or later), which onnxruntime runs on its CPU execution provider. The layouts agree: the
offset of deform group g and kernel tap k (row-major) is the pair of channels
``2 * (g * kH * kW + k)`` (dy) and ``+ 1`` (dx), the mask channel is ``g * kH * kW + k``
(torchvision's layout, which is ours and ONNX's).

Deformable RoI pooling has no standard ONNX operator: exporting a model that calls it
raises :class:`UnsupportedONNXOperatorError` naming ``mmdcnv2.deform_roi_pool``; it never
produces a graph without it.

Two exporters are supported (``exporter=``):

- ``"dynamo"`` (default): ``torch.export`` then ``torch.onnx.export(dynamo=True)`` with a
  ``custom_translation_table`` written in onnxscript (needs the ``onnxscript`` package);
  this is the exporter that PyTorch maintains.
- ``"torchscript"``: the legacy tracing exporter (``torch.onnx.export(dynamo=False)``) with a
  symbolic registered through ``torch.onnx.register_custom_op_symbolic``; needs nothing
  beyond torch, but PyTorch has deprecated it and will remove it.

Plain ``torch.onnx.export(model, args, f, opset_version=19)`` works too, with either exporter:
importing mmdcnv2 adds our translations to the registries the exporters consult by default
(:func:`_register_default_translations`), lazily: nothing is imported until the exporter itself is
(onnxscript is never imported by ``import mmdcnv2``). Explicitly, :func:`onnx_translation_table` can
be passed as ``custom_translation_table`` (dynamo) and :func:`register_onnx_symbolics` registers the
TorchScript symbolics for another opset.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import warnings
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ._ext import has_ops
from ._library import HAS_FAKE_KERNELS, require

__all__ = [
    "MIN_OPSET",
    "UnsupportedONNXOperatorError",
    "export_onnx",
    "onnx_translation_table",
    "register_onnx_symbolics",
]

MIN_OPSET = 19  # DeformConv appeared in opset 19
MAX_TORCHSCRIPT_OPSET = 20  # the newest opset the TorchScript exporter supports (torch 2.14)
_EXPORTERS = ("dynamo", "torchscript")
_ROI_POOL_MESSAGE = (
    "mmdcnv2.deform_roi_pool (deformable RoI pooling) has no standard ONNX operator, so a model that calls "
    "it cannot be exported to ONNX; export the part of the model before it (e.g. the backbone and neck) "
    "and run the RoI pooling in PyTorch"
)


class UnsupportedONNXOperatorError(RuntimeError):
    """A model calls an mmdcnv2 op that has no ONNX counterpart (deformable RoI pooling)."""


def _check_opset(opset: int) -> int:
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise ValueError(f"export_onnx: opset must be an integer >= {MIN_OPSET} (DeformConv), got {opset!r}")
    return opset


# --- dynamo exporter: onnxscript translations ------------------------------------------------------


def _onnxscript_opset(opset: int):
    try:
        import onnxscript
    except ImportError as e:
        raise ImportError(
            "the dynamo ONNX exporter needs the onnxscript package (`pip install onnxscript`); "
            "or call export_onnx(..., exporter='torchscript')"
        ) from e
    # the newest onnxscript opset module that is not newer than the target
    for v in range(opset, MIN_OPSET - 1, -1):
        mod = getattr(onnxscript, f"opset{v}", None)
        if mod is not None:
            return mod
    raise ValueError(f"export_onnx: onnxscript has no module for opset {opset}")


def _deform_conv2d_translation(op):
    """The onnxscript translation of ``mmdcnv2::deform_conv2d`` into ``DeformConv``, built with
    ``op``, an onnxscript opset module (``onnxscript.opset19`` or later)."""

    def deform_conv2d(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups):
        attrs = dict(
            dilations=[int(d) for d in dilation],
            group=int(groups),
            offset_group=int(deform_groups),
            pads=[int(p) for p in padding] * 2,
            strides=[int(s) for s in stride],
        )
        kernel = weight.shape[2:] if weight.shape is not None else None
        if kernel is not None and all(isinstance(k, int) for k in kernel):
            attrs["kernel_shape"] = [int(k) for k in kernel]
        if mask is None:
            if bias is None:
                return op.DeformConv(input, weight, offset, **attrs)
            return op.DeformConv(input, weight, offset, bias, **attrs)
        return op.DeformConv(input, weight, offset, bias, mask, **attrs)  # bias None -> empty input

    return deform_conv2d


def _deform_conv2d_below_min_opset(*args, **kwargs):
    raise ValueError(
        f"mmdcnv2.deform_conv2d becomes the ONNX operator DeformConv, which needs opset_version >= {MIN_OPSET}"
    )


def _deform_roi_pool_translation(*args, **kwargs):
    raise UnsupportedONNXOperatorError(_ROI_POOL_MESSAGE)


def onnx_translation_table(opset: int = MIN_OPSET) -> Dict[Any, Any]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``.

    Importing mmdcnv2 already adds these translations to the dynamo exporter's default registry; pass
    this table where that registration is not in effect (a warning at the exporter's import says so).

    Args:
        opset (int): the ONNX opset the model is exported at, >= 19 (``DeformConv``). Default: 19.

    Returns:
        dict: ``{torch.ops.mmdcnv2.deform_conv2d.default: fn, torch.ops.mmdcnv2.deform_roi_pool.default:
        fn}``, onnxscript functions built with the newest onnxscript opset module not newer than
        ``opset``. The first writes one ONNX ``DeformConv`` node: inputs X, W, offset, then B where
        given (an empty input when only a mask is) and mask where given; attributes dilations, group,
        offset_group, pads, strides and, for a static kernel, kernel_shape. The second raises
        :class:`UnsupportedONNXOperatorError`.

    Raises:
        ValueError: ``opset`` is not an integer >= 19, or onnxscript has no opset module from 19 to it.
        ImportError: the ``onnxscript`` package is not installed.
        AttributeError: the compiled ops are not loaded (``torch.ops.mmdcnv2`` has no such op).

    Example::

        torch.onnx.export(model, (x,), "model.onnx", dynamo=True, opset_version=19,
                          custom_translation_table=onnx_translation_table(19))
    """
    op = _onnxscript_opset(_check_opset(opset))
    return {
        torch.ops.mmdcnv2.deform_conv2d.default: _deform_conv2d_translation(op),
        torch.ops.mmdcnv2.deform_roi_pool.default: _deform_roi_pool_translation,
    }


def _check_no_roi_pool(program: torch.export.ExportedProgram) -> None:
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op == "call_function" and node.target in (
                torch.ops.mmdcnv2.deform_roi_pool.default,
                torch.ops.mmdcnv2.deform_roi_pool,
            ):
                raise UnsupportedONNXOperatorError(f"{_ROI_POOL_MESSAGE} (graph node {node.name})")


def _deform_conv2d_below_min_opset_symbolic(g, *args):
    _deform_conv2d_below_min_opset()


# --- the exporters' default registries ------------------------------------------------------------
#
# torch.onnx.export(dynamo=True) builds, for every call, a registry from torch's own torchlib: the
# functions that torch.onnx._internal.exporter._torchlib.ops declares with its ``onnx_impl`` decorator
# (ATen ops) plus onnxscript's torchlib (where torchvision::deform_conv2d is). We declare ours with the
# same decorator right after torch has declared its own, i.e. when that module is first imported (by the
# exporter, at the first export), so ``import mmdcnv2`` imports neither onnxscript nor the exporter. The
# legacy TorchScript exporter looks symbolics up in a registry that ``torch.onnx.register_custom_op_symbolic``
# fills; ours go in when ``torch.onnx`` is imported. Both are private torch APIs; if they change, a
# warning says so and ``export_onnx`` (which passes the translations explicitly) still works.

_TORCHLIB_OPS = "torch.onnx._internal.exporter._torchlib.ops"
_TORCH_ONNX = "torch.onnx"
_registered = set()


class _LoaderThenCall(importlib.abc.Loader):
    """Runs a module's own loader, then a callback (once the module is fully initialised)."""

    def __init__(self, loader, callback: Callable[[], None]):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name):  # get_source, is_package, get_resource_reader, ...
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``callback`` right after the module ``name`` is first imported (one shot)."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self._name, self._callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self._name:
            return None
        sys.meta_path.remove(self)  # one shot; the other finders find the module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThenCall(spec.loader, self._callback)
        return spec


def _when_imported(name: str, callback: Callable[[], None]) -> None:
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


def _warn_not_registered(exporter: str, e: BaseException) -> None:
    warnings.warn(
        f"mmdcnv2 could not register its ONNX translations with the {exporter} exporter's default registry "
        f"({type(e).__name__}: {e}); plain torch.onnx.export will not export mmdcnv2.deform_conv2d. Use "
        "mmdcnv2.ops.export_onnx, or pass custom_translation_table=mmdcnv2.ops.onnx_translation_table()",
        RuntimeWarning,
        stacklevel=2,
    )


def _register_torchlib() -> None:
    if "dynamo" in _registered:
        return
    try:
        import onnxscript
        from torch.onnx._internal.exporter._torchlib._torchlib_registry import onnx_impl

        conv, pool = torch.ops.mmdcnv2.deform_conv2d.default, torch.ops.mmdcnv2.deform_roi_pool.default
        # the exporter keeps, per op, the functions with the highest opset_introduced <= its opset
        onnx_impl(conv, trace_only=True, opset_introduced=MIN_OPSET)(_deform_conv2d_translation(onnxscript.opset19))
        onnx_impl(conv, trace_only=True, opset_introduced=1)(_deform_conv2d_below_min_opset)
        onnx_impl(pool, trace_only=True, opset_introduced=1)(_deform_roi_pool_translation)
    except Exception as e:  # noqa: BLE001  (a torch whose private API moved: export_onnx still works)
        _warn_not_registered("dynamo", e)
        return
    _registered.add("dynamo")


def _register_torchscript() -> None:
    if "torchscript" in _registered:
        return
    try:
        from torch.onnx import register_custom_op_symbolic  # runs while torch.onnx finishes importing

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
            register_custom_op_symbolic("mmdcnv2::deform_conv2d", _deform_conv2d_below_min_opset_symbolic, 1)
            register_custom_op_symbolic("mmdcnv2::deform_roi_pool", _deform_roi_pool_symbolic, 1)
        register_onnx_symbolics(MIN_OPSET)
    except Exception as e:  # noqa: BLE001
        _warn_not_registered("TorchScript", e)
        return
    _registered.add("torchscript")


def _register_default_translations() -> None:
    """Makes plain ``torch.onnx.export`` (both exporters) translate our ops; called when this module is
    imported, once the compiled ops are loaded. Lazy: each registration runs when its exporter is first
    imported."""
    _when_imported(_TORCHLIB_OPS, _register_torchlib)
    _when_imported(_TORCH_ONNX, _register_torchscript)


# --- TorchScript exporter: symbolics ---------------------------------------------------------------


def _deform_conv2d_symbolic(g, input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups):
    from torch.onnx import symbolic_helper as sh

    stride = sh._get_const(stride, "is", "stride")
    padding = sh._get_const(padding, "is", "padding")
    dilation = sh._get_const(dilation, "is", "dilation")
    groups = sh._get_const(groups, "i", "groups")
    deform_groups = sh._get_const(deform_groups, "i", "deform_groups")
    has_mask, has_bias = not sh._is_none(mask), not sh._is_none(bias)
    inputs = [input, weight, offset]
    if has_mask and not has_bias:
        # DeformConv's inputs are positional (X, W, offset, B, mask): a zero bias of weight's dtype
        cout = g.op(
            "Slice",
            g.op("Shape", weight),
            g.op("Constant", value_t=torch.tensor([0])),
            g.op("Constant", value_t=torch.tensor([1])),
        )
        bias = g.op("CastLike", g.op("ConstantOfShape", cout), weight)
    if has_mask or has_bias:
        inputs.append(bias)
    if has_mask:
        inputs.append(mask)
    attrs = dict(
        dilations_i=list(dilation),
        group_i=groups,
        offset_group_i=deform_groups,
        pads_i=list(padding) * 2,
        strides_i=list(stride),
    )
    sizes = sh._get_tensor_sizes(weight)
    if sizes is not None and len(sizes) == 4 and all(isinstance(k, int) for k in sizes[2:]):
        attrs["kernel_shape_i"] = list(sizes[2:])
    return g.op("DeformConv", *inputs, **attrs)


def _deform_roi_pool_symbolic(g, *args):
    raise UnsupportedONNXOperatorError(_ROI_POOL_MESSAGE)


def register_onnx_symbolics(opset: int = MIN_OPSET) -> None:
    """Registers symbolics with the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), for
    ``opset`` and later: deformable convolution as ONNX ``DeformConv`` (a zero bias of the weight's dtype
    inserted when only a mask is given, as ``DeformConv``'s inputs are positional) and a deformable RoI
    pooling symbolic that raises :class:`UnsupportedONNXOperatorError`.

    Importing mmdcnv2 already registers them at opset 19 (when ``torch.onnx`` is imported, where the
    torch has fake kernels), and :func:`export_onnx` calls this for its opset; call it yourself where
    that registration is not in effect.

    Args:
        opset (int): the first opset they are registered for, >= 19 (``DeformConv``). Default: 19.

    Raises:
        ValueError: ``opset`` is not an integer >= 19.
    """
    from torch.onnx import register_custom_op_symbolic

    _check_opset(opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        register_custom_op_symbolic("mmdcnv2::deform_conv2d", _deform_conv2d_symbolic, opset)
        register_custom_op_symbolic("mmdcnv2::deform_roi_pool", _deform_roi_pool_symbolic, opset)


# --- the one function ------------------------------------------------------------------------------


def _unwrap_unsupported(e: BaseException) -> Optional[UnsupportedONNXOperatorError]:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UnsupportedONNXOperatorError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def export_onnx(
    model: nn.Module,
    args: Sequence[Any],
    path: str | os.PathLike,
    *,
    opset: int = MIN_OPSET,
    exporter: str = "dynamo",
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_shapes: Any = None,
    dynamic_axes: Any = None,
):
    """Exports ``model(*args)`` to the ONNX file ``path``; returns the ``onnx.ModelProto``.

    Our deformable convolutions (v1 and v2, any stride, padding, dilation, groups and deform groups,
    with or without bias) become standard ONNX ``DeformConv`` nodes in the default domain (the rest of
    the model is exported by PyTorch as usual), so the file runs in onnxruntime (CPU execution
    provider) without plugins. Deformable RoI pooling has no ONNX operator: no file is produced
    without it.

    Args:
        model (nn.Module): the model, in the mode it should be exported in (call ``.eval()``); with
            the dynamo exporter also a ``torch.export.ExportedProgram``.
        args (tuple): example inputs (a list is taken as a tuple, anything else as one input).
        path (str or PathLike): the ``.onnx`` file to write (weights inside the file).
        opset (int): ONNX opset, >= 19 (<= 20 with the torchscript exporter). Default: 19.
        exporter (str): ``"dynamo"`` (default: ``torch.export``, then ``torch.onnx.export(dynamo=True)``
            with :func:`onnx_translation_table`; needs onnxscript) or ``"torchscript"`` (the legacy
            tracer with :func:`register_onnx_symbolics`, deprecated by PyTorch).
        input_names, output_names (list of str, optional): names of the graph's inputs and outputs.
        dynamic_shapes: dynamo exporter only, as in ``torch.export.export``.
        dynamic_axes: torchscript exporter only, as in ``torch.onnx.export``.

    Returns:
        onnx.ModelProto: the exported file, loaded with ``onnx.load``.

    Raises:
        UnsupportedONNXOperatorError: the model calls deformable RoI pooling (no ONNX operator), also
            where the exporter wrapped that error in one of its own.
        ValueError: ``opset`` not an integer >= 19 (or above 20 with the torchscript exporter), an
            unknown ``exporter``, or an option of the other exporter (``dynamic_axes`` with dynamo,
            ``dynamic_shapes`` with torchscript).
        RuntimeError: torch older than 2.4 (no fake kernels), naming the release needed.
        ImportError: the ``onnx`` package, or with the dynamo exporter ``onnxscript``, is not installed.
        Exception: any other error of ``torch.export`` or the exporter, unchanged.

    Example::

        model.eval()
        proto = export_onnx(model, (x,), "model.onnx", opset=19, exporter="dynamo")
    """
    require(
        "mmdcnv2.ops.export_onnx (both exporters trace through the ops' fake kernels or need torch.onnx "
        "options of newer releases)"
    )
    import onnx

    _check_opset(opset)
    if exporter not in _EXPORTERS:
        raise ValueError(f"export_onnx: exporter must be one of {_EXPORTERS}, got {exporter!r}")
    if not isinstance(args, tuple):
        args = tuple(args) if isinstance(args, list) else (args,)
    path = os.fspath(path)
    try:
        if exporter == "dynamo":
            if dynamic_axes is not None:
                raise ValueError("export_onnx: dynamic_axes is for exporter='torchscript'; use dynamic_shapes")
            table = onnx_translation_table(opset)
            program = (
                model
                if isinstance(model, torch.export.ExportedProgram)
                else torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
            )
            _check_no_roi_pool(program)
            torch.onnx.export(
                program,
                args,
                path,
                dynamo=True,
                opset_version=opset,
                custom_translation_table=table,
                input_names=input_names,
                output_names=output_names,
                external_data=False,
                verbose=False,
                report=False,
            )
        else:
            if dynamic_shapes is not None:
                raise ValueError("export_onnx: dynamic_shapes is for exporter='dynamo'; use dynamic_axes")
            if opset > MAX_TORCHSCRIPT_OPSET:
                raise ValueError(
                    f"export_onnx: the torchscript exporter supports opset <= {MAX_TORCHSCRIPT_OPSET}, "
                    f"got opset={opset}; use exporter='dynamo'"
                )
            register_onnx_symbolics(opset)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # our shape checks
                torch.onnx.export(
                    model,
                    args,
                    path,
                    dynamo=False,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                )
    except UnsupportedONNXOperatorError:
        raise
    except Exception as e:  # the exporters wrap errors raised by translations and symbolics
        inner = _unwrap_unsupported(e)
        if inner is not None:
            raise UnsupportedONNXOperatorError(str(inner)) from e
        raise
    return onnx.load(path)


if has_ops() and HAS_FAKE_KERNELS:  # plain torch.onnx.export translates our ops from here on (lazily, see above)
    _register_default_translations()
