"""CPU backward passes are bit-identical from run to run (also under
torch.use_deterministic_algorithms), and the ops are safe to call from several threads."""

import threading

import pytest
import torch

from mmdcnv2.ops import deform_conv2d, deform_roi_pool


def _conv_grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 20, 22, generator=g, requires_grad=True)
    off = (torch.randn(2, 2 * 2 * 9, 20, 22, generator=g) * 2).requires_grad_()
    m = torch.rand(2, 2 * 9, 20, 22, generator=g, requires_grad=True)
    w = torch.randn(16, 32, 3, 3, generator=g, requires_grad=True)
    out = deform_conv2d(x, off, w, None, 1, 1, 1, m)
    return [out.detach()] + list(torch.autograd.grad(out, [x, off, m, w], torch.ones_like(out)))


def _pool_grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(2, 16, 24, 24, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 4.0, 6.0, 60.0, 70.0], [1, 10.0, 2.0, 90.0, 50.0], [0, 0.0, 0.0, 95.0, 95.0]])
    off = (torch.randn(3, 2, 7, 7, generator=g) * 0.2).requires_grad_()
    out = deform_roi_pool(feat, rois, off, 7, 0.25, 2)
    return [out.detach()] + list(torch.autograd.grad(out, [feat, off], torch.ones_like(out)))


def test_cpu_backward_is_bitwise_reproducible():
    for fn in (_conv_grads, _pool_grads):
        a = fn()
        torch.use_deterministic_algorithms(True)
        try:
            b = fn()
        finally:
            torch.use_deterministic_algorithms(False)
        for t, u in zip(a, b):
            assert torch.equal(t, u)


def test_ops_are_safe_from_several_threads():
    ref_conv = [_conv_grads(s) for s in range(4)]
    ref_pool = [_pool_grads(s) for s in range(4)]
    results, errors = {}, []

    def work(s):
        try:
            for _ in range(3):
                results[("conv", s)] = _conv_grads(s)
                results[("pool", s)] = _pool_grads(s)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in range(4):
        for t, u in zip(results[("conv", s)], ref_conv[s]):
            assert torch.equal(t, u)
        for t, u in zip(results[("pool", s)], ref_pool[s]):
            assert torch.equal(t, u)


def _cuda_forward(fn_name):
    """One op's output and inputs on CUDA (the inputs of the CPU helpers above, moved to the GPU)."""
    g = torch.Generator().manual_seed(0)
    if fn_name == "deform_conv2d":
        x = torch.randn(2, 32, 20, 22, generator=g).cuda().requires_grad_()
        off = (torch.randn(2, 36, 20, 22, generator=g) * 2).cuda().requires_grad_()
        m = torch.rand(2, 18, 20, 22, generator=g).cuda().requires_grad_()
        w = torch.randn(16, 32, 3, 3, generator=g).cuda().requires_grad_()
        out = deform_conv2d(x, off, w, None, 1, 1, 1, m)
        leaves = [x, off, m, w]
    else:
        feat = torch.randn(2, 16, 24, 24, generator=g).cuda().requires_grad_()
        rois = torch.tensor([[0, 4.0, 6.0, 60.0, 70.0], [1, 10.0, 2.0, 90.0, 50.0]]).cuda()
        off = (torch.randn(2, 2, 7, 7, generator=g) * 0.2).cuda().requires_grad_()
        out = deform_roi_pool(feat, rois, off, 7, 0.25, 2)
        leaves = [feat, off]
    return out, leaves


def _cuda_backward(fn_name, deterministic, warn_only=False):
    out, leaves = _cuda_forward(fn_name)  # (the forward's cuBLAS GEMM has its own deterministic-mode rule)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    try:
        return torch.autograd.grad(out, leaves, torch.ones_like(out))
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["deform_conv2d", "deform_roi_pool"])
def test_cuda_backward_under_deterministic_algorithms_raises(op):
    """The CUDA backward passes scatter with atomics: under use_deterministic_algorithms(True) they
    raise PyTorch's own nondeterminism error (warn_only=True: a warning); otherwise they run."""
    _cuda_backward(op, False)  # the fast path, without the flag
    with pytest.raises(RuntimeError, match=f"mmdcnv2::{op}_backward.*does not have a deterministic implementation"):
        _cuda_backward(op, True)
    with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
        _cuda_backward(op, True, warn_only=True)


@pytest.mark.gpu
def test_cuda_forward_is_bitwise_reproducible_under_deterministic_algorithms(monkeypatch):
    # like any CUDA matmul under deterministic algorithms, the forward's GEMM needs this setting
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    g = torch.Generator().manual_seed(0)
    x, off = torch.randn(2, 8, 9, 9, generator=g).cuda(), torch.randn(2, 18, 9, 9, generator=g).cuda()
    w = torch.randn(4, 8, 3, 3, generator=g).cuda()
    torch.use_deterministic_algorithms(True)
    try:
        a = deform_conv2d(x, off, w, None, 1, 1, 1)
        b = deform_conv2d(x, off, w, None, 1, 1, 1)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(a, b)
