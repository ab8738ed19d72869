"""mmdcnv2 as users install it. Our configs ship inside the package (``mmdcnv2/.mim/configs``, as mmdet
ships its own), so another project inherits them with ``_base_ = "mmdcnv2::<path>"``:

- in the editable install these tests run on (``.mim/configs`` links to the repository's ``configs/``);
- from a wheel built from this repository (C++ only, ``FORCE_CUDA=0``: about 3 minutes on 2 cores, once
  per session; ``MMDCNV2_TEST_WHEEL=<file>`` tests a wheel built before), installed into a fresh
  virtual environment that reuses this one's torch, mmcv and mmdet:
  from a folder outside the repository, a user config inherits ours, builds and predicts, and gives the
  detections of the same model built here from the repository.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import torch

pytest.importorskip("mmdet")

import mmdcnv2  # noqa: E402,F401  (registers mmdcnv2:: with mmengine)
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402

from mmdcnv2.models import DCNv2  # noqa: E402
from mmdcnv2.ops import ModulatedDeformRoIPoolPack  # noqa: E402

register_all_modules()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = "dcnv2/faster-rcnn_r50-dcnv2_fpn_1x_coco.py"  # DCNv2 in c3-c5 and modulated deformable RoI pooling
USER_CONFIG = f"""\
# another project's config: our full DCNv2 detector, three classes
_base_ = "mmdcnv2::{BASE}"
model = dict(roi_head=dict(bbox_head=dict(num_classes=3)))
"""
# what the copy of the repository leaves out (.gitignore's build outputs and the environment)
NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "*.so",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    "work_dirs",
    "data",
    "results",
)


def _repo_configs():
    return sorted(
        os.path.relpath(p, os.path.join(ROOT, "configs"))
        for p in glob.glob(os.path.join(ROOT, "configs", "**", "*"), recursive=True)
        if p.endswith((".py", ".yml"))
    )


# --- the editable install ---------------------------------------------------------------------------


def test_inherit_from_the_editable_install(tmp_path):
    user = tmp_path / "user_config.py"
    user.write_text(USER_CONFIG)
    cfg = Config.fromfile(str(user))
    linked = os.path.join(ROOT, "mmdcnv2", ".mim", "configs", BASE)
    assert os.path.realpath(linked) == os.path.join(ROOT, "configs", BASE)
    assert linked in cfg.text  # the base came through the package, not a relative path
    repo = Config.fromfile(os.path.join(ROOT, "configs", BASE))
    repo.merge_from_dict({"model.roi_head.bbox_head.num_classes": 3})
    assert cfg.model.to_dict() == repo.model.to_dict()


def test_inherit_a_missing_config_names_it(tmp_path):
    user = tmp_path / "user_config.py"
    user.write_text('_base_ = "mmdcnv2::dcnv2/no-such-config.py"\n')
    with pytest.raises(FileNotFoundError, match="no-such-config.py"):
        Config.fromfile(str(user))


def test_model_index_lists_every_config():
    import yaml

    index = yaml.safe_load(open(os.path.join(ROOT, "mmdcnv2", ".mim", "model-index.yml")))
    listed = []
    for meta in index["Import"]:
        for model in yaml.safe_load(open(os.path.join(ROOT, "mmdcnv2", ".mim", meta)))["Models"]:
            assert model["Config"].startswith("configs/") and os.path.isfile(os.path.join(ROOT, model["Config"]))
            assert model["Name"] == os.path.splitext(os.path.basename(model["Config"]))[0]
            listed.append(os.path.relpath(model["Config"], "configs"))
    expected = [p for p in _repo_configs() if p.endswith(".py") and not os.path.basename(p).startswith("_")]
    assert sorted(listed) == expected


# --- a wheel in a fresh environment -----------------------------------------------------------------


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """Builds the wheel from a copy of the repository (the in-place mmdcnv2/_C*.so and build/ stay
    untouched), CPU kernels only; MMDCNV2_TEST_WHEEL=<file> tests that wheel instead."""
    if os.environ.get("MMDCNV2_TEST_WHEEL"):
        return os.environ["MMDCNV2_TEST_WHEEL"]
    src = tmp_path_factory.mktemp("source") / "mmdcnv2"
    shutil.copytree(ROOT, src, symlinks=True, ignore=NOT_SOURCES)
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, FORCE_CUDA="0", CUDA_VISIBLE_DEVICES="", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--disable-pip-version-check",
            "-w",
            str(out),
            str(src),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (whl,) = glob.glob(str(out / "mmdcnv2-*.whl"))
    return whl


@pytest.fixture(scope="session")
def venv(tmp_path_factory, wheel):
    """A fresh virtual environment with the wheel installed; torch, mmcv, mmdet come from this
    environment's site-packages (a .pth line), whose own mmdcnv2 (editable) is not on its path."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=600)
    python = str(root / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(purelib, "zz_reuse_parent_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", "-q", wheel],
        check=True,
        timeout=600,
    )
    return python, purelib


@pytest.mark.slow
def test_wheel_ships_the_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n[len("mmdcnv2/.mim/configs/") :] for n in names if n.startswith("mmdcnv2/.mim/configs/"))
    assert shipped == _repo_configs()
    assert "mmdcnv2/.mim/model-index.yml" in names
    assert any(n.startswith("mmdcnv2/_C") and n.endswith(".so") for n in names)


CHILD = """\
import os, sys
import torch
import mmdcnv2
from mmdcnv2.ops import has_ops
assert mmdcnv2.__file__.startswith({purelib!r}), mmdcnv2.__file__  # the wheel, not the repository
assert has_ops()
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmdet.utils import register_all_modules

register_all_modules()
warnings = []


def record(r):  # mmengine reports registry problems (e.g. a scope without a registry) as warnings
    if r.levelname in ("WARNING", "ERROR"):
        warnings.append(r.getMessage())
    return True


MMLogger.get_current_instance().addFilter(record)
cfg = Config.fromfile("user_config.py")
assert os.path.join({purelib!r}, "mmdcnv2", ".mim", "configs", {base!r}) in cfg.text
torch.manual_seed(0)
model = MODELS.build(cfg.model)
assert not warnings, warnings
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, p in model.named_parameters():  # offsets and masks that deform
        if "conv_offset" in name or "offset_fc.4" in name or "mask_fc.2" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
packed = demo_mm_inputs(1, [[3, 128, 160]], num_items=[2], num_classes=3)
model.eval()
with torch.no_grad():
    (res,) = model(**model.data_preprocessor(packed, False), mode="predict")
torch.save(dict(state_dict=model.state_dict(), packed=packed, bboxes=res.pred_instances.bboxes,
                scores=res.pred_instances.scores, labels=res.pred_instances.labels), "out.pth")
print("user model built and ran from", os.path.dirname(mmdcnv2.__file__))
"""


@pytest.mark.slow
def test_wheel_user_config_builds_and_predicts(venv, tmp_path):
    python, purelib = venv
    user = tmp_path / "another_project"  # outside the repository
    user.mkdir()
    (user / "user_config.py").write_text(USER_CONFIG)
    (user / "run.py").write_text(CHILD.format(purelib=purelib, base=BASE))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [python, "run.py"], cwd=user, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    out = torch.load(user / "out.pth", weights_only=False)

    # the same model from the repository's config and kernels (this process: the editable install)
    cfg = Config.fromfile(os.path.join(ROOT, "configs", BASE))
    cfg.merge_from_dict({"model.roi_head.bbox_head.num_classes": 3})
    model = MODELS.build(cfg.model)
    assert sum(isinstance(m, DCNv2) for m in model.modules()) == 13  # c3-c5 of ResNet-50
    assert sum(isinstance(m, ModulatedDeformRoIPoolPack) for m in model.modules()) == 4  # one per FPN level
    model.load_state_dict(out["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        (res,) = model(**model.data_preprocessor(out["packed"], False), mode="predict")
    assert len(out["bboxes"]) > 0
    torch.testing.assert_close(res.pred_instances.bboxes, out["bboxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(res.pred_instances.scores, out["scores"], rtol=1e-4, atol=1e-5)
    assert torch.equal(res.pred_instances.labels, out["labels"])


TRAIN_CONFIG = """\
# another project's config: our DCNv2 detector for the embedded dataset, two iterations on a tiny copy
_base_ = "mmdcnv2::shapes/faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py"
data_root = {data!r}
loader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root))
train_dataloader = loader
val_dataloader = loader
test_dataloader = loader
val_evaluator = dict(ann_file=data_root + "annotations/val.json")
test_evaluator = val_evaluator
train_cfg = dict(max_iters=2, val_interval=1000)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
"""


@pytest.mark.slow
def test_wheel_mim_train_and_test(venv, tmp_path):
    """`mim train mmdcnv2` / `mim test mmdcnv2` run the wheel's .mim/tools scripts (ours, which import
    mmdcnv2 and run mmdet's), so a user config that inherits ours trains and tests."""
    from mmdcnv2.datasets import make_shapes_dataset

    python, purelib = venv
    data = tmp_path / "shapes"
    make_shapes_dataset(str(data), num_train=4, num_val=2, size=96, progress=None)
    user = tmp_path / "another_project"
    user.mkdir()
    (user / "my_detector.py").write_text(TRAIN_CONFIG.format(data=str(data) + "/"))
    env = dict({k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, OMP_NUM_THREADS="1")

    def mim(*args):
        run = subprocess.run(
            [python, "-m", "mim", *args], cwd=user, env=env, capture_output=True, text=True, timeout=900
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        return run.stdout + run.stderr

    log = mim("train", "mmdcnv2", "my_detector.py", "--gpus", "0", "--work-dir", "work")
    assert os.path.join(purelib, "mmdcnv2", ".mim", "tools", "train.py") in log  # mim ran the wheel's script
    assert (user / "work" / "iter_2.pth").is_file()
    assert "Failed to search registry" not in log and "Failed to import" not in log  # the scopes build cleanly
    log = mim(
        "test", "mmdcnv2", "my_detector.py", "--checkpoint", "work/iter_2.pth", "--gpus", "0", "--work-dir", "test"
    )
    assert "coco/bbox_mAP" in log
