"""Let torch >= 2.6's ``torch.load(weights_only=True)`` read mmengine's own checkpoints.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that
means weights_only=True, which refuses the few non-tensor types that mmengine
itself writes into every checkpoint (the message hub's HistoryBuffer with its numpy
arrays, numpy scalars in the runtime info). So ``mim test`` and ``resume`` after
``mim train`` fail. Instead of switching weights_only off globally, we allow exactly
those types with ``torch.serialization.add_safe_globals``; everything else stays refused.
"""

import pickle

import numpy as np
import torch


def _numpy_globals():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    dtype_classes = [
        type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_)
    ]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes]


def _history_buffer_statistic(obj, name):
    """Stands in for ``builtins.getattr`` while unpickling: a HistoryBuffer pickles its
    statistics methods ('min', 'max', 'mean', 'current') as getattr(HistoryBuffer, name);
    that is the only getattr it allows."""
    from mmengine.logging.history_buffer import HistoryBuffer

    allowed = {"min", "max", "mean", "current", *HistoryBuffer._statistics_methods}
    if obj is HistoryBuffer and isinstance(name, str) and name in allowed:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f"refused getattr({obj!r}, {name!r}): only HistoryBuffer's statistics methods are allowed"
    )


def mmengine_checkpoint_globals():
    """The non-tensor types found in checkpoints that mmengine's Runner writes."""
    from mmengine.logging.history_buffer import HistoryBuffer

    return [HistoryBuffer, (_history_buffer_statistic, "builtins.getattr"), *_numpy_globals()]


def allow_mmengine_checkpoints() -> None:
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
