"""mmdet's tools/train.py with mmdcnv2 imported first, so that the config may inherit ours
(``_base_ = "mmdcnv2::dcnv2/<config>.py"``): mmengine reads ``_base_`` before it imports the config's
``custom_imports``.

    python tools/train.py CONFIG [mmdet's train.py options]
    mim train mmdcnv2 CONFIG [options]     # from a wheel install (this file is mmdcnv2/.mim/tools/train.py)
"""

import os
import runpy
import sys

import mmdcnv2  # noqa: F401  (registers mmdcnv2:: with mmengine, our components and checkpoint fixes)


def run_mmdet_tool(name: str) -> None:
    import mmdet

    script = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "tools", name)
    if not os.path.isfile(script):
        sys.exit(f"mmdet's {name} is not at {script}: install mmdet from PyPI (`pip install mmdet`), which ships it")
    sys.argv[0] = script
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    run_mmdet_tool("train.py")
