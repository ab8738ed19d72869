"""DeformStatsHook: the logged offset and modulation statistics against values computed here from the
geometry, and real mmengine training runs whose offsets run away or turn NaN."""

import glob
import json
import math
import os

import pytest
import torch
from torch import nn

pytest.importorskip("mmdet")

import mmdcnv2  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402
from mmengine.registry import HOOKS as MMENGINE_HOOKS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmdcnv2.engine.hooks import DeformStatsHook  # noqa: E402
from mmdcnv2.engine.hooks.deform_stats_hook import sampling_stats, stage_of  # noqa: E402
from mmdcnv2.ops import DeformConv2dPack, ModulatedDeformConv2d, ModulatedDeformConv2dPack  # noqa: E402
from mmdcnv2.registry import HOOKS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 12  # input maps are SIZE x SIZE
BATCH = 2


# --- a tiny model with our layers -------------------------------------------------------------------


class Tiny(BaseModel):
    """A stem, a stage of two Pack layers (DCNv2 3x3 pad 1; DCNv1 3x3 stride 2 pad 2 dilation 2, two deform
    groups) and a caller-given ModulatedDeformConv2d whose offset and mask are buffers passed as keywords.
    ``hooked`` records, per forward, how many module hooks the statistics had attached."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.backbone = nn.Module()
        self.backbone.layer3 = nn.Sequential(
            ModulatedDeformConv2dPack(4, 4, 3, padding=1),
            DeformConv2dPack(4, 4, 3, stride=2, padding=2, dilation=2, deform_groups=2),
        )
        self.head = ModulatedDeformConv2d(4, 4, 3, padding=1)
        g = torch.Generator().manual_seed(1)
        ho = (SIZE + 4 - 4 - 1) // 2 + 1
        # offsets of a few pixels: some sampling points beyond the 6x6 map, a quarter of them exact halves
        self.register_buffer("offset", torch.randn(BATCH, 18, ho, ho, generator=g) * 3, persistent=False)
        self.register_buffer("mask", torch.rand(BATCH, 9, ho, ho, generator=g), persistent=False)
        self.hooked = []

    def forward(self, inputs, data_samples=None, mode="tensor"):
        self.hooked.append(
            len(self.backbone.layer3[0].conv_offset._forward_hooks)
            + len(self.backbone.layer3[1].conv_offset._forward_hooks)
            + len(self.head._forward_pre_hooks)
        )
        x = self.backbone.layer3(self.stem(inputs))
        x = self.head(x, offset=self.offset, mask=self.mask)
        if mode == "loss":
            return dict(loss=x.pow(2).mean())
        return x


class Images(torch.utils.data.Dataset):
    def __init__(self, n=4):
        self.x = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i])


def set_offsets(layer, dy, dx, mask_bias=None):
    """conv_offset: weight zero, bias a constant dy / dx per channel (DCNv1 and mmcv's DCNv2 layout alike:
    the offset channels 2k and 2k + 1 are tap k's dy and dx); the mask channels ``mask_bias``."""
    conv = layer.conv_offset
    n_off = 2 * layer.deform_groups * layer.kernel_size[0] * layer.kernel_size[1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias[:n_off:2] = dy
        conv.bias[1:n_off:2] = dx
        if mask_bias is not None:
            conv.bias[n_off:] = mask_bias


def train(model, work_dir, hooks, iters, lr=0.0, log_interval=1):
    runner = Runner(
        model=model,
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=Images(),
            sampler=dict(type="InfiniteSampler", shuffle=False),
            batch_size=BATCH,
            num_workers=0,
            collate_fn=dict(type="default_collate"),
        ),
        train_cfg=dict(by_epoch=False, max_iters=iters),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=lr)),
        default_hooks=dict(logger=dict(type="LoggerHook", interval=log_interval), checkpoint=None),
        custom_hooks=hooks,
        log_processor=dict(by_epoch=False),
        default_scope="mmdet",
        experiment_name=f"deform_stats_{os.path.basename(str(work_dir))}",  # a logger and visualiser of its own
    )
    runner.train()
    return runner


def run_files(work_dir):
    (log,) = glob.glob(os.path.join(str(work_dir), "*", "*.log"))
    (scalars,) = glob.glob(os.path.join(str(work_dir), "*", "vis_data", "scalars.json"))
    with open(log) as f:
        text = f.read()
    with open(scalars) as f:
        rows = [json.loads(line) for line in f]
    return text, rows


def warnings_in(text):
    return [line for line in text.splitlines() if "WARNING" in line and "DeformStatsHook" in line]


# --- values computed here, by plain loops over the geometry ----------------------------------------


def inside(y, x, H, W):
    return -1 < y < H and -1 < x < W


def outside_share_constant(layer, H, W, dy, dx):
    """Share of sampling points outside an H x W map for a layer whose every offset is (dy, dx)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = total = 0
    for ho in range(Ho):
        for wo in range(Wo):
            for ki in range(kh):
                for kj in range(kw):
                    total += 1
                    out += not inside(ho * sh - ph + ki * dh + dy, wo * sw - pw + kj * dw + dx, H, W)
    return out / total, total


def outside_share_tensor(layer, offset, H, W):
    """The same for any offset Tensor[N, 2 * dg * K, Ho, Wo]: one point per image, deform group, tap, position."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    N, C, Ho, Wo = offset.shape
    K = kh * kw
    off = offset.tolist()
    out = total = 0
    for n in range(N):
        for g in range(C // (2 * K)):
            for ki in range(kh):
                for kj in range(kw):
                    k = ki * kw + kj
                    for ho in range(Ho):
                        for wo in range(Wo):
                            dy, dx = off[n][2 * (g * K + k)][ho][wo], off[n][2 * (g * K + k) + 1][ho][wo]
                            total += 1
                            out += not inside(ho * sh - ph + ki * dh + dy, wo * sw - pw + kj * dw + dx, H, W)
    return out / total


# --- tests ---------------------------------------------------------------------------------------------


def test_stage_keys():
    assert stage_of("backbone.layer3.0.conv2") == "backbone.layer3"
    assert stage_of("roi_head.bbox_head.shared_convs.1.conv") == "roi_head.bbox_head.shared_convs"
    assert stage_of("neck.dcn") == "neck"
    assert stage_of("dcn") == "dcn"
    assert stage_of("0.conv") == "0"


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(interval=0), "interval"),
        (dict(interval=-3), "interval"),
        (dict(interval=2.5), "interval"),
        (dict(interval=True), "interval"),
        (dict(max_offset=-1.0), "max_offset"),
        (dict(max_offset="big"), "max_offset"),
        (dict(max_offset=float("nan")), "max_offset"),
        (dict(max_outside_ratio=-0.1), "max_outside_ratio"),
        (dict(max_outside_ratio=1.5), "max_outside_ratio"),
        (dict(group_by="block"), "group_by"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        DeformStatsHook(**kwargs)


def test_known_offsets_reach_the_message_hub(tmp_path):
    """Zero conv_offset weights and constant biases: every offset and mask value is known. lr 0 keeps them."""
    model = Tiny()
    mdcn, dcn = model.backbone.layer3
    set_offsets(mdcn, 1.5, 1.5, mask_bias=0.7)
    set_offsets(dcn, -2.25, 0.5)
    hook = DeformStatsHook(interval=2, group_by="layer")
    runner = train(model, tmp_path, [hook], iters=4, log_interval=2)
    hub = runner.message_hub

    def logged(key, stat):
        buf = hub.log_scalars[f"train/deform/{key}/{stat}"]
        values, _ = buf.data
        assert len(values) == 2, "logged on iterations 2 and 4 only"
        assert values[0] == values[1]
        return float(values[-1])

    # the hooks were attached on the logged iterations only (3 module hooks on iterations 2 and 4)
    assert model.hooked == [0, 3, 0, 3]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # DCNv2 Pack: |offset| 1.5 everywhere, mask sigmoid(0.7) everywhere
    share, _ = outside_share_constant(mdcn, SIZE, SIZE, 1.5, 1.5)
    assert logged("backbone.layer3.0", "offset_abs_mean") == pytest.approx(1.5, abs=1e-12)
    assert logged("backbone.layer3.0", "outside_ratio") == pytest.approx(share, abs=1e-12)
    assert 0 < share < 1
    assert logged("backbone.layer3.0", "mask_mean") == pytest.approx(1 / (1 + math.exp(-0.7)), abs=1e-6)
    assert logged("backbone.layer3.0", "mask_std") == pytest.approx(0.0, abs=1e-9)
    # DCNv1 Pack (stride 2, padding 2, dilation 2, two deform groups): dy -2.25, dx 0.5; no mask keys
    share1, _ = outside_share_constant(dcn, SIZE, SIZE, -2.25, 0.5)
    assert logged("backbone.layer3.1", "offset_abs_mean") == pytest.approx((2.25 + 0.5) / 2, abs=1e-12)
    assert logged("backbone.layer3.1", "outside_ratio") == pytest.approx(share1, abs=1e-12)
    assert "train/deform/backbone.layer3.1/mask_mean" not in hub.log_scalars
    # the caller-given layer: what was passed to forward (keywords), random offsets and mask
    H = (SIZE + 4 - 4 - 1) // 2 + 1
    assert logged("head", "offset_abs_mean") == pytest.approx(model.offset.abs().double().mean().item(), rel=1e-9)
    assert logged("head", "outside_ratio") == pytest.approx(
        outside_share_tensor(model.head, model.offset, H, H), abs=1e-12
    )
    assert logged("head", "mask_mean") == pytest.approx(model.mask.double().mean().item(), rel=1e-9)
    assert logged("head", "mask_std") == pytest.approx(model.mask.double().std(unbiased=False).item(), rel=1e-7)
    # no warnings: nothing ran away
    text, rows = run_files(tmp_path)
    assert not warnings_in(text)
    # in the log line and the visualiser's scalars, without the train/ prefix
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[-1]["deform/backbone.layer3.0/offset_abs_mean"] == pytest.approx(1.5)
    assert "deform/head/mask_std" in rows[-1]
    assert "deform/backbone.layer3.0/offset_abs_mean: 1.5000" in text


def test_stage_grouping_pools_the_layers(tmp_path):
    model = Tiny()
    mdcn, dcn = model.backbone.layer3
    set_offsets(mdcn, 1.5, 1.5, mask_bias=-0.4)
    set_offsets(dcn, -2.25, 0.5)
    runner = train(model, tmp_path, [dict(type="mmdcnv2.DeformStatsHook", interval=1)], iters=1)
    hub = runner.message_hub
    s0, n0 = outside_share_constant(mdcn, SIZE, SIZE, 1.5, 1.5)
    s1, n1 = outside_share_constant(dcn, SIZE, SIZE, -2.25, 0.5)
    n0, n1 = n0 * BATCH, n1 * BATCH * 2  # points: per image (and deform group)
    # offset values: 2 per point
    expect_abs = (1.5 * 2 * n0 + (2.25 + 0.5) * n1) / (2 * n0 + 2 * n1)
    assert hub.get_scalar("train/deform/backbone.layer3/offset_abs_mean").current() == pytest.approx(expect_abs)
    assert hub.get_scalar("train/deform/backbone.layer3/outside_ratio").current() == pytest.approx(
        (s0 * n0 + s1 * n1) / (n0 + n1)
    )
    # the stage's mask statistics are those of its modulated layer
    assert hub.get_scalar("train/deform/backbone.layer3/mask_mean").current() == pytest.approx(
        1 / (1 + math.exp(0.4)), abs=1e-6
    )
    assert "train/deform/head/offset_abs_mean" in hub.log_scalars
    assert not any(k.startswith("train/deform/backbone.layer3.") for k in hub.log_scalars)


class GrowOffsets(Hook):
    """Multiplies the offset biases of ``layer`` by ``factor`` after every iteration: offsets that run away."""

    def __init__(self, factor):
        self.factor = factor

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        layer = runner.model.backbone.layer3[0]
        with torch.no_grad():
            layer.conv_offset.bias[:18] *= self.factor


def test_runaway_offsets_warn_once_naming_the_layer(tmp_path):
    model = Tiny()
    set_offsets(model.backbone.layer3[0], 1.0, 1.0)
    # |offset| 1, 4, 16, 64, 256, ...: above max_offset=32 from iteration 4 on, finite throughout
    train(
        model,
        tmp_path,
        [dict(type="mmdcnv2.DeformStatsHook", interval=1, max_offset=32), GrowOffsets(4.0)],
        iters=7,
        lr=0.01,
    )
    text, rows = run_files(tmp_path)
    warned = warnings_in(text)
    assert len(warned) == 1, warned
    assert "the ModulatedDeformConv2dPack layer backbone.layer3.0 ran away at iteration 4" in warned[0]
    assert "max_offset=32 px" in warned[0]
    means = [r["deform/backbone.layer3/offset_abs_mean"] for r in rows]
    assert len(means) == 7 and all(b > a for a, b in zip(means, means[1:]))
    assert means[-1] > 32 * 4 and rows[-1]["deform/backbone.layer3/outside_ratio"] > 0.5


class Poison(Hook):
    """Sets one mask bias of the DCNv2 layer to NaN before iteration ``at`` (1-based)."""

    def __init__(self, at):
        self.at = at

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter + 1 == self.at:
            with torch.no_grad():
                runner.model.backbone.layer3[0].conv_offset.bias[18] = float("nan")


def test_nan_offsets_warn_naming_the_layer(tmp_path):
    model = Tiny()
    train(model, tmp_path, [DeformStatsHook(interval=1), Poison(at=3)], iters=5, lr=0.01)
    text, rows = run_files(tmp_path)
    warned = warnings_in(text)
    assert warned, text[-3000:]
    assert (
        "non-finite offsets or mask in the ModulatedDeformConv2dPack layer backbone.layer3.0 at iteration 3"
        in warned[0]
    )
    assert "0 of 5184 offset values and 288 of 2592 mask values are NaN or inf" in warned[0]
    # the NaN spreads through the backward to every parameter: the other layers warn too, each layer once
    named = [line.split(" layer ")[1].split(" ")[0] for line in warned]
    assert len(named) == len(set(named)) and set(named) <= {"backbone.layer3.0", "backbone.layer3.1"}
    assert math.isnan(rows[2]["deform/backbone.layer3/mask_mean"])
    assert not math.isnan(rows[1]["deform/backbone.layer3/mask_mean"])


@pytest.mark.gpu
def test_statistics_agree_on_cuda():
    """The same statistics from CUDA tensors (float32; float16 as under autocast), on the device."""
    g = torch.Generator().manual_seed(3)
    off = torch.randn(2, 36, 5, 7, generator=g) * 4  # 3x3, two deform groups, stride 2 on a 9x13 map
    mask = torch.rand(2, 18, 5, 7, generator=g)
    geometry = ((9, 13), (3, 3), (2, 2), (1, 1), (1, 1))
    cpu = sampling_stats(off, mask, *geometry)
    gpu = sampling_stats(off.cuda(), mask.cuda(), *geometry)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float64
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
    half = sampling_stats(off.cuda().half(), mask.cuda().half(), *geometry).cpu()
    assert half[1] == cpu[1] and half[3] == cpu[3]  # the counts
    torch.testing.assert_close(half[0] / half[1], cpu[0] / cpu[1], rtol=1e-3, atol=0)


def test_shapes_configs_hold_the_hook():
    cfg = Config.fromfile(os.path.join(ROOT, "configs", "shapes", "faster-rcnn_r18-mdconv-c3-c5-dpool_fpn_shapes.py"))
    (hook_cfg,) = [h for h in cfg.custom_hooks if "DeformStatsHook" in h["type"]]
    assert hook_cfg["type"] == "mmdcnv2.DeformStatsHook"
    assert hook_cfg["interval"] == cfg.default_hooks.logger.interval
    hook = HOOKS.build(dict(hook_cfg))
    assert isinstance(hook, DeformStatsHook) and hook.interval == cfg.default_hooks.logger.interval
    # as the Runner builds it: mmengine's registry, the config's default scope
    assert isinstance(MMENGINE_HOOKS.build(dict(hook_cfg)), DeformStatsHook)


def test_shapes_detector_run_logs_its_dcn_stages(tmp_path):
    """Two iterations of the shapes DCNv2 detector (c3-c5) with the config's hook at interval 1."""
    from mmdcnv2.datasets import make_shapes_dataset

    data = str(tmp_path / "data")
    make_shapes_dataset(data, num_train=2, num_val=1, size=64, progress=None)
    cfg = Config.fromfile(os.path.join(ROOT, "configs", "shapes", "faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py"))
    cfg.train_dataloader.dataset.data_root = data + "/"
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    cfg.train_dataloader.batch_size = 1
    cfg.train_dataloader.dataset.pipeline[2].scale = (64, 64)
    cfg.val_dataloader = cfg.test_dataloader = cfg.val_cfg = cfg.test_cfg = None
    cfg.val_evaluator = cfg.test_evaluator = None
    cfg.train_cfg.max_iters = 2
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint = None
    for h in cfg.custom_hooks:
        if h["type"] == "mmdcnv2.DeformStatsHook":
            h["interval"] = 1
    cfg.work_dir = str(tmp_path / "work")
    # a logger and a visualiser of its own: mmengine hands an existing instance of the same name (the config's
    # "visualizer", a timestamp shared with another run of the same second) to a new runner, with its save dir
    cfg.experiment_name = f"deform_stats_shapes_{tmp_path.name}"
    cfg.visualizer.name = f"deform_stats_shapes_{tmp_path.name}"
    Runner.from_cfg(cfg).train()
    text, rows = run_files(tmp_path / "work")
    for stage in ("backbone.layer2", "backbone.layer3", "backbone.layer4"):
        for stat in ("offset_abs_mean", "outside_ratio", "mask_mean", "mask_std"):
            assert all(math.isfinite(r[f"deform/{stage}/{stat}"]) for r in rows), (stage, stat)
    assert not any(k.startswith("deform/backbone.layer1") for k in rows[-1])
    assert not warnings_in(text)
    print(next(line for line in text.splitlines() if "deform/backbone.layer3/offset_abs_mean" in line))
