"""Geometry of the effective sampling locations on hand-built cases, and the tool's picture."""

import os

import pytest
import torch

from mmdcnv2.visualization import LayerGeometry, effective_sampling_points, roi_bin_centres


def layer(H=8, W=8, k=3, pad=1, stride=1, dil=1, offset=None, mask=None):
    off = torch.zeros(2 * k * k, H, W) if offset is None else offset
    return LayerGeometry(off, mask, (k, k), (stride, stride), (pad, pad), (dil, dil))


def as_set(pts):
    return sorted({(round(float(y), 6), round(float(x), 6)) for y, x in pts})


def test_zero_offsets_give_the_regular_grid():
    pts, w = effective_sampling_points([layer(dil=2, pad=2)], (3, 4))
    assert as_set(pts) == sorted((3 + dy, 4 + dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2))
    assert torch.all(w == 1)
    pts, _ = effective_sampling_points([layer(stride=2, pad=1)], (2, 1))
    assert as_set(pts) == sorted((3 + dy, 1 + dx) for dy in (0, 1, 2) for dx in (0, 1, 2))


def test_constant_offset_shifts_every_point():
    off = torch.zeros(18, 8, 8)
    off[0::2] = 0.75  # dy
    off[1::2] = -1.5  # dx
    pts, _ = effective_sampling_points([layer(offset=off)], (4, 4))
    ref, _ = effective_sampling_points([layer()], (4, 4))
    torch.testing.assert_close(pts, ref + torch.tensor([0.75, -1.5], dtype=torch.float64))


def test_stacking_composes():
    pts, w = effective_sampling_points([layer(), layer()], (4, 4))
    assert pts.shape == (81, 2) and len(w) == 81
    assert as_set(pts) == sorted((4 + dy, 4 + dx) for dy in range(-2, 3) for dx in range(-2, 3))
    # an offset in the lower layer moves the 9 points below each upper point
    off = torch.zeros(18, 8, 8)
    off[0::2] = 1.0
    pts2, _ = effective_sampling_points([layer(offset=off), layer()], (4, 4))
    torch.testing.assert_close(pts2, pts + torch.tensor([1.0, 0.0], dtype=torch.float64))
    # three layers: up to 729 points
    pts3, _ = effective_sampling_points([layer()] * 3, (4, 4))
    assert pts3.shape == (729, 2)


def test_mask_weights_multiply_and_a_zero_mask_hides_a_point():
    mask = torch.full((9, 8, 8), 0.5)
    mask[4] = 0.0  # the centre tap
    pts, w = effective_sampling_points([layer(mask=mask)], (3, 3))
    centre = (pts[:, 0] == 3) & (pts[:, 1] == 3)
    assert w[centre].item() == 0 and torch.all(w[~centre] == 0.5)
    _, w2 = effective_sampling_points([layer(mask=torch.full((9, 8, 8), 0.5))] * 2, (3, 3))
    assert torch.allclose(w2, torch.full_like(w2, 0.25))


def test_roi_bin_centres():
    moved, base = roi_bin_centres(torch.tensor([10.0, 20.0, 50.0, 40.0]), None, (2, 4))
    assert torch.equal(moved, base)
    torch.testing.assert_close(base[0, 0], torch.tensor([15.0, 25.0], dtype=torch.float64))
    off = torch.zeros(2, 2, 4)
    off[0] = 0.5  # x, in units of gamma * roi width
    moved, base = roi_bin_centres(torch.tensor([10.0, 20.0, 50.0, 40.0]), off, (2, 4), gamma=0.1)
    torch.testing.assert_close(moved - base, torch.tensor([2.0, 0.0], dtype=torch.float64).expand(2, 4, 2))


def test_tool_writes_a_picture(tmp_path):
    pytest.importorskip("mmdet")
    import mmdcnv2  # noqa: F401
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from PIL import Image

    from mmdcnv2.datasets import make_shapes_dataset

    register_all_modules()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    data = make_shapes_dataset(str(tmp_path / "data"), num_train=1, num_val=1, size=96, progress=None)
    image = str(tmp_path / "data" / "val" / "000000.png")
    cfg_path = os.path.join(root, "configs", "shapes", "faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py")
    model = MODELS.build(Config.fromfile(cfg_path).model)
    with torch.no_grad():  # make the deformable layers deform and the head detect something
        for n, p in model.named_parameters():
            if "conv_offset" in n or "offset_fc.4" in n or "mask_fc.2" in n:
                p.normal_(0, 0.05)
        model.roi_head.bbox_head.fc_cls.bias[:-1] = 5.0
    ckpt = str(tmp_path / "model.pth")
    torch.save({"state_dict": model.state_dict(), "meta": {"dataset_meta": {"classes": ("a",) * 5}}}, ckpt)
    import importlib.util

    spec = importlib.util.spec_from_file_location("visualize", os.path.join(root, "tools", "visualize.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tool.visualize(
        [("DCNv2", cfg_path, ckpt), ("DCNv2 again", cfg_path, ckpt)],
        image,
        stage=4,
        units="auto",
        out=str(tmp_path / "vis.png"),
    )
    im = Image.open(out)
    assert im.size[0] > 500 and im.size[1] > 500
    assert data
