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
    ``meta['cfg']``, so its check never runs. With ``auto_scale_lr`` enabled the learning rate
    follows the batch and the change is only logged. Checkpoints that do not say how many
    processes wrote them (from ``mim train``, mmdet's model zoo) are resumed as before.
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
        if (runner.auto_scale_lr or {}).get("enable", False):
            runner.logger.info(f"resuming a run of {saved} processes with {now}: auto_scale_lr rescales the "
                               "learning rate to the new batch")
            return
        raise WorldSizeError(f"the checkpoint was written by a run of {saved} processes (WORLD_SIZE={saved}), this "
                             f"run has {now}: the batch of a step and with it the training would change. Resume with "
                             f"{saved} processes, or enable auto_scale_lr (--auto-scale-lr) to rescale the learning "
                             "rate to the new batch")
