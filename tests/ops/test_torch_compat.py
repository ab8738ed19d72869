"""The ops on every supported torch (2.1 to 2.14): eager mode everywhere, and on a torch without the
fake-kernel API (< 2.4) a clear refusal, naming the release needed, of what rests on fake kernels."""

import pytest
import torch

from mmdcnv2.ops import deform_conv2d, deform_conv2d_reference, deform_roi_pool, deform_roi_pool_reference
from mmdcnv2.ops._library import FAKE_KERNELS_NEED, HAS_FAKE_KERNELS, torch_version

NEEDS = f"needs torch >= {FAKE_KERNELS_NEED}"


def _conv_inputs(dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, dtype=dtype, generator=g)
    off = torch.randn(2, 18, 6, 6, dtype=dtype, generator=g)
    msk = torch.rand(2, 9, 6, 6, dtype=dtype, generator=g)
    w = torch.randn(3, 4, 3, 3, dtype=dtype, generator=g)
    b = torch.randn(3, dtype=dtype, generator=g)
    return [t.requires_grad_(requires_grad) for t in (x, off, msk, w, b)]


def test_torch_version_parses():
    major, minor = torch_version()
    assert (major, minor) >= (2, 1)
    assert torch.__version__.startswith(f"{major}.{minor}")


def test_direct_op_calls_have_autograd():
    """torch.ops.mmdcnv2.deform_conv2d itself (not only our Python wrapper) is differentiable: through
    torch.library.register_autograd on a new torch, through our Autograd-key kernel on an old one."""
    x, off, msk, w, b = _conv_inputs(requires_grad=True)
    out = torch.ops.mmdcnv2.deform_conv2d(x, w, off, msk, b, [1, 1], [1, 1], [1, 1], 1, 1)
    assert out.requires_grad
    grads = torch.autograd.grad(out.square().sum(), (x, off, msk, w, b))
    ref = deform_conv2d_reference(x, off, w, b, padding=1, mask=msk)
    want = torch.autograd.grad(ref.square().sum(), (x, off, msk, w, b))
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-9)


def test_gradcheck_through_the_registered_autograd():
    g = torch.Generator().manual_seed(1)
    shapes = [(1, 2, 4, 4), (1, 18, 4, 4), (1, 9, 4, 4), (2, 2, 3, 3), (2,)]
    x, off, msk, w, b = [torch.randn(s, dtype=torch.float64, generator=g).requires_grad_() for s in shapes]
    assert torch.autograd.gradcheck(
        lambda x, o, m, w, b: torch.ops.mmdcnv2.deform_conv2d(x, w, o, m, b, [1, 1], [1, 1], [1, 1], 1, 1),
        (x, off, msk, w, b),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_the_op_in_float32(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            pass
    except RuntimeError as e:  # torch < 2.2 autocasts the CPU to bfloat16 only
        pytest.skip(f"torch {torch.__version__}: {e}")
    x, off, msk, w, b = _conv_inputs(torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        out = deform_conv2d(x.to(dtype), off.to(dtype), w, b, padding=1, mask=msk)
        pooled = deform_roi_pool(x.to(dtype), torch.tensor([[0, 0.0, 0.0, 5.0, 5.0]]), None, 2)
    assert out.dtype == torch.float32 and pooled.dtype == torch.float32
    want = deform_conv2d_reference(
        x.to(dtype).double(), off.to(dtype).double(), w.double(), b.double(), padding=1, mask=msk.double()
    )
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    want_pool = deform_roi_pool_reference(
        x.to(dtype).double(), torch.tensor([[0, 0.0, 0.0, 5.0, 5.0]]).double(), None, 2
    )
    torch.testing.assert_close(pooled.double(), want_pool, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(HAS_FAKE_KERNELS, reason="this torch has fake kernels: the refusals do not apply")
class TestRefusalsWithoutFakeKernels:
    def test_meta_tensors(self):
        x, off, msk, w, b = [t.to("meta") for t in _conv_inputs(torch.float32)]
        with pytest.raises(RuntimeError, match=NEEDS):
            torch.ops.mmdcnv2.deform_conv2d(x, w, off, msk, b, [1, 1], [1, 1], [1, 1], 1, 1)

    def test_torch_compile_fullgraph(self):
        from mmdcnv2.ops import ModulatedDeformConv2dPack

        m = ModulatedDeformConv2dPack(4, 3, 3, padding=1)
        with pytest.raises(Exception, match=NEEDS):
            torch.compile(m, fullgraph=True)(torch.randn(1, 4, 6, 6))

    def test_torch_export(self):
        from mmdcnv2.ops import ModulatedDeformConv2dPack

        with pytest.raises(Exception, match=NEEDS):
            torch.export.export(ModulatedDeformConv2dPack(4, 3, 3, padding=1), (torch.randn(1, 4, 6, 6),))

    @pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
    def test_export_onnx(self, tmp_path, exporter):
        from mmdcnv2.ops import ModulatedDeformConv2dPack, export_onnx

        with pytest.raises(RuntimeError, match=NEEDS):
            export_onnx(
                ModulatedDeformConv2dPack(4, 3, 3, padding=1),
                (torch.randn(1, 4, 6, 6),),
                tmp_path / "m.onnx",
                exporter=exporter,
            )
