"""The pieces of the CPU multi-process launcher, in one process: launch variables, the config
set-up for MMDistributedDataParallel, the all-or-nothing checkpoint backend. (The
multi-process runs themselves are in tests/e2e/test_distributed.py.)"""

import os

import pytest

pytest.importorskip("mmdet")

import mmdcnv2  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402
from mmengine.fileio import get_file_backend  # noqa: E402

from mmdcnv2.engine import ATOMIC_BACKEND, AtomicLocalBackend, LaunchError, configure_cpu_ddp, launch_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOOD = dict(RANK="1", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="node0", MASTER_PORT="29500")


def test_launch_env_reads_torchrun_variables():
    assert launch_env(GOOD) == dict(
        rank=1, world_size=4, local_rank=1, local_world_size=2, master_addr="node0", master_port=29500
    )


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(RANK=None), "RANK not set: start this script with torchrun"),
        (dict(MASTER_ADDR=None, MASTER_PORT=None), r"MASTER_ADDR, MASTER_PORT not set"),
        (dict(WORLD_SIZE="0"), "WORLD_SIZE must be >= 1, got 0"),
        (dict(RANK="4"), r"RANK must be in \[0, WORLD_SIZE=4\), got 4"),
        (dict(RANK="-1"), r"RANK must be in \[0, WORLD_SIZE=4\), got -1"),
        (dict(RANK="one"), "RANK must be an integer, got 'one'"),
        (dict(LOCAL_RANK="2"), "LOCAL_RANK=2, LOCAL_WORLD_SIZE=2"),
        (dict(LOCAL_WORLD_SIZE="8"), "LOCAL_WORLD_SIZE=8, WORLD_SIZE=4"),
        (dict(MASTER_PORT="70000"), r"MASTER_PORT must be in \[1, 65535\], got 70000"),
    ],
)
def test_launch_env_names_the_bad_variable(change, match):
    env = {k: v for k, v in dict(GOOD, **change).items() if v is not None}
    with pytest.raises(LaunchError, match=match):
        launch_env(env)


def test_configure_cpu_ddp():
    cfg = Config.fromfile(os.path.join(ROOT, "configs", "shapes", "faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py"))
    cfg.model_wrapper_cfg = dict(detect_anomalous_params=True)
    configure_cpu_ddp(cfg, timeout_s=60)
    assert cfg.launcher == "pytorch"
    assert cfg.model_wrapper_cfg == dict(
        type="MMDistributedDataParallel",
        detect_anomalous_params=True,
        device_ids=None,
        output_device=None,
        broadcast_buffers=False,
        find_unused_parameters=False,
    )
    assert cfg.env_cfg.dist_cfg == dict(backend="gloo", timeout=60)
    assert cfg.default_hooks.checkpoint.backend_args == dict(backend=ATOMIC_BACKEND)
    hooks = [
        dict(type="mmdcnv2.DeformStatsHook", interval=25),
        dict(type="mmdcnv2.SyncNormStatsHook"),
        dict(type="mmdcnv2.WorldSizeHook", resume=False),
    ]
    assert cfg.custom_hooks == hooks
    configure_cpu_ddp(cfg)
    assert cfg.custom_hooks == hooks  # once
    # a backend the config chose is kept; find_unused_parameters from the config is honoured
    cfg = Config(
        dict(
            default_hooks=dict(checkpoint=dict(type="CheckpointHook", backend_args=dict(backend="local"))),
            find_unused_parameters=True,
        )
    )
    configure_cpu_ddp(cfg)
    assert cfg.default_hooks.checkpoint.backend_args == dict(backend="local")
    assert cfg.model_wrapper_cfg.find_unused_parameters is True
    # synchronised BN runs on GPUs only: refused with the reason
    cfg = Config.fromfile(os.path.join(ROOT, "configs", "shapes", "faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py"))
    cfg.model.backbone.norm_cfg = dict(type="SyncBN", requires_grad=True)
    with pytest.raises(ValueError, match=r"synchronised BN \(norm_cfg type SyncBN\), which runs on GPUs only"):
        configure_cpu_ddp(cfg)
    with pytest.raises(ValueError, match=r"synchronised BN \(sync_bn='torch'\)"):
        configure_cpu_ddp(Config(dict(sync_bn="torch")))
    with pytest.raises(ValueError, match="model_wrapper_cfg.type must be MMDistributedDataParallel"):
        configure_cpu_ddp(Config(dict(model_wrapper_cfg=dict(type="MMFullyShardedDataParallel"))))


def test_atomic_backend_writes_all_or_nothing(tmp_path):
    backend = get_file_backend(str(tmp_path), backend_args=dict(backend=ATOMIC_BACKEND))
    assert isinstance(backend, AtomicLocalBackend)
    path = tmp_path / "sub" / "iter_1.pth"
    backend.put(b"first", str(path))
    assert path.read_bytes() == b"first"
    backend.put_text("second", path)
    assert path.read_text() == "second"
    # a write that fails half-way leaves the existing file as it was and no temporary file
    with pytest.raises(TypeError):
        backend.put(object(), str(path))
    assert path.read_text() == "second"
    assert sorted(os.listdir(path.parent)) == ["iter_1.pth"]
