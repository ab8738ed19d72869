"""Lets configs inherit ours with ``_base_ = "mmdcnv2::dcnv2/<config>.py"``, like ``mmdet::``.

mmengine 0.10.7 resolves ``<package>::<path>`` to ``<installed package>/.mim/configs/<path>`` (where
mmdet ships its configs, and where a wheel of mmdcnv2 has ours; ``pyproject.toml``), with two limits
that importing mmdcnv2 lifts for mmdcnv2 only:

- it accepts only the OpenMMLab packages listed in its ``MODULE2PACKAGE``; any other name fails with
  ``AssertionError: mmengine does not support to load mmdcnv2 config``. We add ours.
- it finds the installed package from its distribution's location (site-packages), which is wrong for
  an editable install (``pip install -e .``), whose files stay in the repository. For ``mmdcnv2`` it now
  takes the folder of the package actually imported; for every other package nothing changes.

mmengine reads ``_base_`` before it imports a config's ``custom_imports``, so the process that reads the
config must have imported mmdcnv2 first (see the README: "Inheriting our configs").
"""

import os

_PACKAGE = "mmdcnv2"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def register_config_package() -> None:
    """Makes ``mmdcnv2::<path>`` resolve to ``<this package>/.mim/configs/<path>`` in mmengine configs."""
    from mmengine.config import config as config_module
    from mmengine.config import utils

    utils.MODULE2PACKAGE.setdefault(_PACKAGE, _PACKAGE)
    original = config_module.get_installed_path
    if getattr(original, "_mmdcnv2", False):
        return

    def get_installed_path(package: str) -> str:
        if package == _PACKAGE:
            return _PACKAGE_DIR
        return original(package)

    get_installed_path._mmdcnv2 = True
    get_installed_path.__doc__ = original.__doc__
    config_module.get_installed_path = get_installed_path
