import pytest
import torch

from mmdcnv2.ops._library import FAKE_KERNELS_NEED, HAS_FAKE_KERNELS


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_fake = pytest.mark.skip(
        reason=f"needs torch >= {FAKE_KERNELS_NEED} (fake kernels: torch.compile, "
        f"torch.export, opcheck, meta tensors); this is torch {torch.__version__}"
    )
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "fake_kernels" in item.keywords and not HAS_FAKE_KERNELS:
            item.add_marker(skip_fake)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
