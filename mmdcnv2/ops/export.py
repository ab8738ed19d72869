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

Users of ``torch.onnx.export`` itself can pass :func:`onnx_translation_table` as
``custom_translation_table`` (dynamo) or call :func:`register_onnx_symbolics` first
(TorchScript).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

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


def onnx_translation_table(opset: int = MIN_OPSET) -> Dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: our
    deformable convolution as ONNX ``DeformConv``; deformable RoI pooling raises
    :class:`UnsupportedONNXOperatorError`."""
    op = _onnxscript_opset(_check_opset(opset))

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

    def deform_roi_pool(*args, **kwargs):
        raise UnsupportedONNXOperatorError(_ROI_POOL_MESSAGE)

    return {
        torch.ops.mmdcnv2.deform_conv2d.default: deform_conv2d,
        torch.ops.mmdcnv2.deform_roi_pool.default: deform_roi_pool,
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
        cout = g.op("Slice", g.op("Shape", weight), g.op("Constant", value_t=torch.tensor([0])),
                    g.op("Constant", value_t=torch.tensor([1])))
        bias = g.op("CastLike", g.op("ConstantOfShape", cout), weight)
    if has_mask or has_bias:
        inputs.append(bias)
    if has_mask:
        inputs.append(mask)
    attrs = dict(dilations_i=list(dilation), group_i=groups, offset_group_i=deform_groups,
                 pads_i=list(padding) * 2, strides_i=list(stride))
    sizes = sh._get_tensor_sizes(weight)
    if sizes is not None and len(sizes) == 4 and all(isinstance(k, int) for k in sizes[2:]):
        attrs["kernel_shape_i"] = list(sizes[2:])
    return g.op("DeformConv", *inputs, **attrs)


def _deform_roi_pool_symbolic(g, *args):
    raise UnsupportedONNXOperatorError(_ROI_POOL_MESSAGE)


def register_onnx_symbolics(opset: int = MIN_OPSET) -> None:
    """Registers, for the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``)
    at ``opset`` and later, our deformable convolution as ONNX ``DeformConv`` and a
    deformable RoI pooling symbolic that raises :class:`UnsupportedONNXOperatorError`."""
    _check_opset(opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        torch.onnx.register_custom_op_symbolic("mmdcnv2::deform_conv2d", _deform_conv2d_symbolic, opset)
        torch.onnx.register_custom_op_symbolic("mmdcnv2::deform_roi_pool", _deform_roi_pool_symbolic, opset)


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

    Our deformable convolutions become standard ``DeformConv`` nodes (the rest of the model is
    exported by PyTorch as usual), so the file runs in onnxruntime (CPU) without plugins.

    Args:
        model (nn.Module): the model, in the mode it should be exported in (call ``.eval()``).
        args (tuple): example inputs.
        path (str or PathLike): the ``.onnx`` file to write (weights inside the file).
        opset (int): ONNX opset, >= 19 (<= 20 with the torchscript exporter).
        exporter (str): ``"dynamo"`` (``torch.export`` based, needs onnxscript) or
            ``"torchscript"`` (legacy tracer, deprecated by PyTorch).
        input_names, output_names (list of str, optional): names of the graph's inputs and outputs.
        dynamic_shapes: dynamo exporter only, as in ``torch.export.export``.
        dynamic_axes: torchscript exporter only, as in ``torch.onnx.export``.

    Raises:
        UnsupportedONNXOperatorError: the model calls deformable RoI pooling (no ONNX operator).
        ValueError: bad ``opset`` or ``exporter``, or an option of the other exporter.
    """
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
            program = model if isinstance(model, torch.export.ExportedProgram) else torch.export.export(
                model, args, dynamic_shapes=dynamic_shapes)
            _check_no_roi_pool(program)
            torch.onnx.export(program, args, path, dynamo=True, opset_version=opset,
                              custom_translation_table=table, input_names=input_names,
                              output_names=output_names, external_data=False, verbose=False, report=False)
        else:
            if dynamic_shapes is not None:
                raise ValueError("export_onnx: dynamic_shapes is for exporter='dynamo'; use dynamic_axes")
            if opset > MAX_TORCHSCRIPT_OPSET:
                raise ValueError(f"export_onnx: the torchscript exporter supports opset <= {MAX_TORCHSCRIPT_OPSET}, "
                                 f"got opset={opset}; use exporter='dynamo'")
            register_onnx_symbolics(opset)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # our shape checks
                torch.onnx.export(model, args, path, dynamo=False, opset_version=opset,
                                  input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    except UnsupportedONNXOperatorError:
        raise
    except Exception as e:  # the exporters wrap errors raised by translations and symbolics
        inner = _unwrap_unsupported(e)
        if inner is not None:
            raise UnsupportedONNXOperatorError(str(inner)) from e
        raise
    return onnx.load(path)
