"""Hooks that tests/e2e/test_distributed.py puts into training runs (through the config's
custom_imports; the workers find this module on PYTHONPATH). They observe and steer real runs:
no part of mmengine, mmdet or torch is replaced."""

import json
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class SeedEveryIterHook(Hook):
    """Seeds torch, numpy and random before every iteration with ``seed + iter * world_size + rank``:
    the batch that rank r trains at iteration k of a W-process run gets the same random numbers
    (the RPN's and RoI head's samplers, the mimicking branch's choice of RoIs) as batch
    k * W + r of a one-process run that trains those batches one after the other."""

    priority = "VERY_HIGH"

    def __init__(self, seed=0):
        self.seed = seed

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        s = self.seed + runner.iter * get_world_size() + get_rank()
        torch.manual_seed(s)
        np.random.seed(s)
        random.seed(s)


@HOOKS.register_module()
class RecordHook(Hook):
    """Writes, per rank, into ``out_dir``: ``rank<r>.json`` (for every iteration the image ids of
    the batch and the logged values, plus the checkpoint files this process opened for writing)
    and ``rank<r>_params.pth`` (the model's parameters and buffers at the end). With
    ``save_initial`` the weights before the first iteration go to ``initial.pth`` (rank 0)."""

    priority = "VERY_LOW"

    def __init__(self, out_dir, save_initial=False, audit_writes=True):
        self.out_dir = out_dir
        self.save_initial = save_initial
        self.iters = []
        self.writes = []
        if audit_writes:
            sys.addaudithook(self._audit)

    def _audit(self, event, args):
        if event == "open" and isinstance(args[0], str) and args[1] and any(c in args[1] for c in "wax+"):
            name = os.path.basename(args[0])
            if name.endswith((".pth", ".partial")) or name == "last_checkpoint":
                self.writes.append(args[0])

    @staticmethod
    def _model(runner):
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def before_train(self, runner):
        if self.save_initial and get_rank() == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            torch.save({"state_dict": self._model(runner).state_dict()}, os.path.join(self.out_dir, "initial.pth"))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        ids = [int(s.img_id) for s in data_batch["data_samples"]]
        logged = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in (outputs or {}).items()}
        self.iters.append(dict(iter=runner.iter, img_ids=ids, outputs=logged))

    def after_run(self, runner):
        rank = get_rank()
        os.makedirs(self.out_dir, exist_ok=True)
        state = {k: v.detach().clone() for k, v in self._model(runner).state_dict().items()}
        torch.save(state, os.path.join(self.out_dir, f"rank{rank}_params.pth"))
        with open(os.path.join(self.out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(dict(rank=rank, world_size=get_world_size(), iters=self.iters, writes=self.writes), f)


@HOOKS.register_module()
class DieHook(Hook):
    """SIGKILLs this process (no clean-up, like the OOM killer) on rank ``rank``:
    ``at='iter'``: before iteration ``iter`` (0-based) starts, once every rank got there (so
    rank 0 has finished saving the checkpoint of the iteration before);
    ``at='hang'``: like 'iter', but sleeps instead of dying (alive, never in the next collective);
    ``at='commit'``: while saving the checkpoint of iteration ``iter`` (1-based, as in
    ``iter_<n>.pth``), at the moment its finished temporary file is renamed into place."""

    def __init__(self, rank, iter, at="iter"):
        assert at in ("iter", "hang", "commit")
        self.rank, self.iter, self.at = rank, iter, at
        if at == "commit" and get_rank() == rank:
            target = f"iter_{iter}.pth"
            sys.addaudithook(
                lambda event, args: self._kill()
                if event == "os.rename" and str(args[1]).endswith(os.sep + target)
                else None
            )

    @staticmethod
    def _kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if self.at in ("iter", "hang") and runner.iter == self.iter:
            torch.distributed.barrier()
            if get_rank() == self.rank:
                if self.at == "hang":
                    time.sleep(3600)
                self._kill()
