"""A local file backend whose writes are all-or-nothing, for checkpoints.

mmengine's ``LocalBackend.put`` opens the destination and writes into it, so a process killed
in the middle (a crash, the launcher stopping every rank when one fails, a cancelled job)
leaves a truncated ``iter_N.pth`` under the name of a finished checkpoint. This backend writes
``<path>.partial``, flushes it to disk, then renames it over ``<path>`` (``os.replace`` is
atomic on POSIX): the destination either does not exist yet or holds the whole file.
A ``.partial`` left by a killed process never matches ``iter_*.pth`` and is overwritten by
the next save.

Use it for any config's checkpoints (``tools/dist_train.py`` sets it unless the config
chooses a backend)::

    default_hooks = dict(checkpoint=dict(backend_args=dict(backend="atomic_local")))

mmengine's ``CheckpointHook`` writes ``last_checkpoint`` only after ``save_checkpoint``
returns, so it never names a checkpoint that is not complete.
"""

import contextlib
import os
import os.path as osp
from pathlib import Path
from typing import Union

from mmengine.fileio import LocalBackend, register_backend

ATOMIC_BACKEND = "atomic_local"
PARTIAL_SUFFIX = ".partial"


def write_atomic(data: bytes, filepath: Union[str, Path]) -> None:
    """Writes ``data`` to ``filepath`` through ``<filepath>.partial`` and a rename."""
    filepath = str(filepath)
    os.makedirs(osp.dirname(osp.abspath(filepath)), exist_ok=True)
    partial = filepath + PARTIAL_SUFFIX
    try:
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, filepath)
    except BaseException:  # also SystemExit/KeyboardInterrupt: leave no partial file behind
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


class AtomicLocalBackend(LocalBackend):
    """mmengine's ``LocalBackend`` with ``put``/``put_text`` written through a rename."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        write_atomic(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = "utf-8") -> None:
        write_atomic(obj.encode(encoding), filepath)


register_backend(ATOMIC_BACKEND, AtomicLocalBackend)
