"""WorldSizeHook: a run is resumed with the number of processes it was trained with."""

from mmengine.dist import get_world_size
from mmengine.hooks import Hook

from mmdcnv2.registry import HOOKS

from ..distributed import LaunchError


class WorldSizeError(LaunchError):
    """A checkpoint trained by W processes resumed by a different number of them."""


@HOOKS.register_module()
class WorldSizeHook(Hook):
    """Writes the number of processes into every checkpoint (``meta['world_size']``) and, when
    ``resume`` is set, refuses to resume a checkpoint written by a run with a different number.

    The batch of one step is processes x batch size, so resuming with another number changes the
    batch and, at the same learning rate, the training. mmengine 0.10.7 means to check this
    (``Runner.resume`` compares ``gpu_ids`` in ``meta['config']``) but writes the config under
    ``meta['cfg']``, so its check never runs. ``auto_scale_lr`` does not make it safe: mmengine
    scales the learning rate before it resumes, and the resume then restores the optimizer's and
    the schedulers' learning rates of the old batch. To go on with another number of processes,
    start a new run from the checkpoint's weights (``load_from``). Checkpoints that do not say how
    many processes wrote them (from ``mim train``, mmdet's model zoo) are resumed as before.

    ``tools/dist_train.py`` (``mmdcnv2.engine.configure_cpu_ddp``) adds it with the run's ``resume``;
    in another run, add it to the config, with ``resume`` equal to the config's::

        custom_hooks = [dict(type="mmdcnv2.WorldSizeHook", resume=True)]

    Args:
        resume (bool): whether this run resumes (mmengine calls ``after_load_checkpoint`` for
            ``load_from`` as well; only a resume is checked). Default: False.

    Raises:
        WorldSizeError: (a ``LaunchError``) in ``after_load_checkpoint``, when ``resume`` is set and
            the checkpoint's ``meta['world_size']`` differs from this run's world size.
    """

    priority = "VERY_HIGH"

    def __init__(self, resume: bool = False):
        self.resume = resume

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})["world_size"] = get_world_size()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        saved = (checkpoint.get("meta") or {}).get("world_size")
        now = get_world_size()
        if not self.resume or saved is None or saved == now:
            return
        raise WorldSizeError(
            f"the checkpoint was written by a run of {saved} processes (WORLD_SIZE={saved}), this "
            f"run has {now}: the batch of a step and with it the training would change (a resume "
            f"restores the old learning rates, even with auto_scale_lr). Resume with {saved} "
            "processes, or start a new run from its weights (load_from=CHECKPOINT)"
        )
