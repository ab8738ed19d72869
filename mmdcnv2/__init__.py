"""mmdcnv2: Deformable ConvNets v2 for mmdetection, on compiled CPU and CUDA ops.

``import mmdcnv2`` loads the ops (``mmdcnv2.ops``, usable from plain PyTorch) and,
where mmdet is installed, registers the mmdet components under the scope
``mmdcnv2`` (what ``custom_imports = dict(imports=['mmdcnv2'])`` in a config does)
and makes mmengine's checkpoints loadable on current torch.
"""

import importlib.util

from . import ops  # noqa: F401

__version__ = "0.1.0"

if importlib.util.find_spec("mmdet") is not None:
    from . import compat  # noqa: F401
    from . import engine  # noqa: F401
    from . import models  # noqa: F401
