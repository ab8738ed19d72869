"""MimicHook: schedules the feature-mimicking losses and reports how well the features agree."""

from typing import Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from mmdcnv2.registry import HOOKS


@HOOKS.register_module()
class MimicHook(Hook):
    """Around a ``mmdcnv2.MimicRCNN`` during training.

    * Schedules the scale of both mimicking losses (on top of their ``loss_weight``):
      0 before ``begin_iter``; a linear ramp from 0 to 1 over ``warmup_iters``; 1 until
      ``end_iter`` (exclusive; ``None``: to the end), 0 from then on. With the scale at 0
      the branch is not run at all (no crops, no extra backbone pass).
    * Logs the scale (``mimic_scale``) with the other training scalars; the branch itself
      logs ``mimic_cos`` (mean cosine similarity of the mimicked pairs), ``mimic_acc``
      and ``mimic_rois``.
    * At the end of training, writes to the log how the mean cosine similarity moved
      (mean over the first and the last ``summary_window`` iterations that mimicked).

    Usage, beside a ``model = dict(type='mmdcnv2.MimicRCNN', ...)``::

        custom_hooks = [dict(type="mmdcnv2.MimicHook", begin_iter=0, warmup_iters=500)]

    Without the hook the branch runs with scale 1 in every iteration.

    Args:
        begin_iter (int): first iteration (0-based) with a non-zero scale, >= 0. Default: 0.
        warmup_iters (int): length of the ramp, >= 0: at iteration ``it`` the scale is
            ``min(1, (it - begin_iter + 1) / warmup_iters)``; 0: no ramp. Default: 0.
        end_iter (int, optional): first iteration at scale 0 again, >= ``begin_iter``; ``None``: the
            branch stays on to the end. Default: ``None``.
        summary_window (int): iterations averaged for the end-of-training summary, >= 1. Default: 50.

    Raises:
        ValueError: an argument out of its range (above) or not an int.
        TypeError: in ``before_train`` and later, a model (inside its wrapper) without a
            feature-mimicking branch: not a ``mmdcnv2.MimicRCNN``.
    """

    priority = "NORMAL"

    def __init__(
        self, begin_iter: int = 0, warmup_iters: int = 0, end_iter: Optional[int] = None, summary_window: int = 50
    ):
        for name, value in (
            ("begin_iter", begin_iter),
            ("warmup_iters", warmup_iters),
            ("summary_window", summary_window),
        ):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if end_iter is not None and (not isinstance(end_iter, int) or end_iter < begin_iter):
            raise ValueError(f"end_iter must be None or an int >= begin_iter ({begin_iter}), got {end_iter!r}")
        if summary_window < 1:
            raise ValueError(f"summary_window must be >= 1, got {summary_window}")
        self.begin_iter, self.warmup_iters, self.end_iter = begin_iter, warmup_iters, end_iter
        self.summary_window = summary_window
        self._cos = []

    def scale_at(self, it: int) -> float:
        """The loss scale at (0-based) iteration ``it``."""
        if it < self.begin_iter or (self.end_iter is not None and it >= self.end_iter):
            return 0.0
        if self.warmup_iters == 0:
            return 1.0
        return min(1.0, (it - self.begin_iter + 1) / self.warmup_iters)

    @staticmethod
    def _branch(runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        branch = getattr(model, "mimic", None)
        if branch is None or not hasattr(branch, "loss_scale"):
            raise TypeError(
                f"MimicHook needs a model with a feature-mimicking branch (type='mmdcnv2.MimicRCNN'), "
                f"got {type(model).__name__}"
            )
        return branch

    def before_train(self, runner) -> None:
        self._branch(runner)
        self._cos = []

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        scale = self.scale_at(runner.iter)
        self._branch(runner).loss_scale = scale
        runner.message_hub.update_scalar("train/mimic_scale", scale)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if outputs and "mimic_cos" in outputs and self._branch(runner).loss_scale > 0:
            self._cos.append(float(outputs["mimic_cos"]))

    def after_train(self, runner) -> None:
        if self._cos:
            n = min(self.summary_window, len(self._cos))
            first, last = sum(self._cos[:n]) / n, sum(self._cos[-n:]) / n
            runner.logger.info(
                f"feature mimicking: mean cosine similarity {first:.3f} over the first {n} "
                f"mimicking iterations, {last:.3f} over the last {n}"
            )
