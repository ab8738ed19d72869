"""A short real run on a tiny copy of the embedded dataset: train, COCO test, resume."""

import os

import pytest
import torch

pytest.importorskip("mmdet")

import mmdcnv2  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmdcnv2.datasets import make_shapes_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "shapes", "faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py")


def tiny_cfg(data, work_dir, iters, **over):
    cfg = Config.fromfile(CONFIG)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = data + "/"
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
        cfg[loader].batch_size = 2
    for ev in ("val_evaluator", "test_evaluator"):
        cfg[ev].ann_file = data + "/annotations/val.json"
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = 1000
    cfg.default_hooks.checkpoint.interval = 3
    cfg.default_hooks.logger.interval = 1
    cfg.work_dir = work_dir
    cfg.merge_from_dict(over)
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(str(root), num_train=8, num_val=4, size=96, progress=None)
    return str(root)


def test_train_test_and_resume(data, tmp_path):
    work = str(tmp_path / "work")
    runner = Runner.from_cfg(tiny_cfg(data, work, iters=6))
    model = runner.train()
    assert runner.iter == 6
    ckpt = os.path.join(work, "iter_6.pth")
    assert os.path.exists(ckpt) and os.path.exists(os.path.join(work, "iter_3.pth"))
    # the checkpoint loads with torch's default weights_only=True (mmdcnv2's compat allow-list)
    state = torch.load(ckpt, map_location="cpu")
    assert "message_hub" in state and "state_dict" in state
    # a COCO evaluation with pycocotools, from the checkpoint
    tester = Runner.from_cfg(tiny_cfg(data, str(tmp_path / "test"), iters=6, load_from=ckpt))
    metrics = tester.test()
    assert "coco/bbox_mAP" in metrics and 0.0 <= metrics["coco/bbox_mAP"] <= 1.0
    loaded = tester.model.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded[k], v)
    # resume from iteration 6 and go on to 8
    resumed = Runner.from_cfg(tiny_cfg(data, work, iters=8, resume=True))
    resumed.train()
    assert resumed.iter == 8 and os.path.exists(os.path.join(work, "iter_6.pth"))


class NotAllowed:
    pass


class SneakyGetattr:
    """Pickles as getattr(HistoryBuffer, '__init__'): a getattr that is not a statistics method."""

    def __reduce__(self):
        from mmengine.logging.history_buffer import HistoryBuffer

        return getattr, (HistoryBuffer, "__init__")


@pytest.mark.parametrize("obj,match", [(NotAllowed(), "Unsupported global"), (SneakyGetattr(), "refused getattr")])
def test_checkpoint_allow_list_is_narrow(tmp_path, obj, match):
    path = tmp_path / "evil.pth"
    torch.save({"x": obj}, path)
    with pytest.raises(Exception, match=match):
        torch.load(path)
