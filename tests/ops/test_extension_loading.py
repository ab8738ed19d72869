"""A missing extension, or one built without CUDA kernels, gives one clear error that says what to run."""

from types import SimpleNamespace

import pytest
import torch

from mmdcnv2.ops import _ext


def test_missing_extension_message(monkeypatch):
    monkeypatch.setattr(_ext, "_LOAD_ERROR", ImportError("mmdcnv2._C not found"))
    assert not _ext.has_ops()
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e"):
        _ext.assert_has_ops(torch.zeros(1))


def test_missing_cuda_kernels_message(monkeypatch):
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: False)
    fake_cuda_tensor = SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(RuntimeError, match="FORCE_CUDA=1"):
        _ext.assert_has_ops(fake_cuda_tensor)
    _ext.assert_has_ops(torch.zeros(1))  # CPU tensors are fine
