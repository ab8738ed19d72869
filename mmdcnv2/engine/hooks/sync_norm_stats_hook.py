"""SyncNormStatsHook: one set of normalisation statistics on every process, after every iteration."""

import torch
import torch.distributed as dist
from mmengine.dist import is_distributed
from mmengine.hooks import Hook
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mmdcnv2.registry import HOOKS


@HOOKS.register_module()
class SyncNormStatsHook(Hook):
    """Averages the running statistics of the model's norm layers that are in training mode (BN
    running means and variances) over the processes after every training iteration; integer
    buffers (``num_batches_tracked``) take rank 0's values. Frozen norm layers are left alone.

    Without it, each process of a data-parallel run keeps BN statistics of its own batches
    (``MMDistributedDataParallel`` with ``broadcast_buffers=False``, mmengine's default): rank 0
    saves its statistics in the checkpoint while every other rank validates its share of the
    images with different ones, so the validation during training is not the checkpoint's.
    mmengine's ``SyncBuffersHook`` averages only before validation, after the checkpoint of that
    iteration has been written. Averaging is linear, so the result is the running average of
    the batch statistics averaged over the processes. One collective per iteration over the
    buffers (a few kilobytes for a ResNet). A no-op in a single process.

    ``tools/dist_train.py`` (``mmdcnv2.engine.configure_cpu_ddp``) adds it; in another distributed
    run, add it to the config (no arguments)::

        custom_hooks = [dict(type="mmdcnv2.SyncNormStatsHook")]

    Norm layers are those derived from torch's ``_NormBase`` (the BatchNorm and InstanceNorm
    families) with ``track_running_stats``; the buffers are reduced in one flat tensor per dtype
    (floating ones averaged with ``all_reduce``, the others broadcast from rank 0).
    """

    priority = "NORMAL"  # before CheckpointHook (VERY_LOW) and validation

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not is_distributed() or dist.get_world_size() == 1:
            return
        # only the statistics that training changes: norm layers in training mode (frozen ones, e.g.
        # mmdet's norm_eval=True, are equal everywhere, and repeated averaging could drift them by an ulp)
        buffers = [
            b
            for m in runner.model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
            for b in m.buffers(recurse=False)
            if b is not None
        ]
        floats = [b for b in buffers if b.is_floating_point()]
        others = [b for b in buffers if not b.is_floating_point()]
        for group, reduce in ((floats, True), (others, False)):
            by_dtype = {}
            for b in group:
                by_dtype.setdefault(b.dtype, []).append(b)
            for tensors in by_dtype.values():
                flat = _flatten_dense_tensors([t.data for t in tensors])
                if reduce:
                    dist.all_reduce(flat)
                    flat /= dist.get_world_size()
                else:
                    dist.broadcast(flat, src=0)
                with torch.no_grad():
                    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                        t.copy_(synced)
