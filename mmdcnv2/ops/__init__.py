"""The torch-level API of mmdcnv2: functional ops and nn.Modules. Needs no mmdet."""

from ._ext import column_budget, cpu_route, has_cuda_kernels, has_ops
from .deform_conv import (
    DeformConv2d,
    DeformConv2dPack,
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    deform_conv2d,
)
from .deform_roi_pool import DeformRoIPool, DeformRoIPoolPack, ModulatedDeformRoIPoolPack, deform_roi_pool
from .export import UnsupportedONNXOperatorError, export_onnx, onnx_translation_table, register_onnx_symbolics
from .reference import deform_conv2d_reference, deform_roi_pool_reference

__all__ = [
    "has_ops",
    "has_cuda_kernels",
    "column_budget",
    "cpu_route",
    "deform_conv2d",
    "deform_conv2d_reference",
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "deform_roi_pool",
    "deform_roi_pool_reference",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
    "export_onnx",
    "onnx_translation_table",
    "register_onnx_symbolics",
    "UnsupportedONNXOperatorError",
]
