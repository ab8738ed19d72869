"""mmdet's tools/test.py with mmdcnv2 imported first, so that the config may inherit ours
(``_base_ = "mmdcnv2::dcnv2/<config>.py"``).

    python tools/test.py CONFIG CHECKPOINT [mmdet's test.py options]
    mim test mmdcnv2 CONFIG --checkpoint CHECKPOINT [options]   # from a wheel install
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import run_mmdet_tool  # noqa: E402  (imports mmdcnv2)

if __name__ == "__main__":
    run_mmdet_tool("test.py")
