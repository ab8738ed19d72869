"""mmdcnv2.visualization.draw_detection_grid: ground truth beside detections, enlarged."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mmdcnv2.datasets import make_shapes_dataset
from mmdcnv2.visualization import draw_dataset_grid, draw_detection_grid
from mmdcnv2.visualization.detections import PALETTE


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(str(root), num_train=1, num_val=3, size=64, progress=None)
    return root


def _results(path, boxes):
    res = [
        dict(
            img_id=i,
            pred_instances=dict(
                bboxes=torch.tensor(b, dtype=torch.float32).view(-1, 4),
                scores=torch.tensor([0.9, 0.1][: len(b)]),
                labels=torch.tensor([1, 2][: len(b)]),
            ),
        )
        for i, b in enumerate(boxes)
    ]
    with open(path, "wb") as f:
        pickle.dump(res, f)


def test_grid_layout_and_boxes_where_they_belong(data, tmp_path):
    pkl = tmp_path / "r.pkl"
    # image 0: a confident box and one under the threshold; image 1: none
    _results(pkl, [[[10, 10, 40, 30], [2, 2, 20, 20]], [], []])
    out = draw_detection_grid(
        str(pkl),
        str(data / "annotations" / "val.json"),
        str(data),
        str(tmp_path / "g.png"),
        image_ids=[0, 1, 2],
        scale=2,
        score_thr=0.3,
        columns=2,
    )
    grid = np.asarray(Image.open(out).convert("RGB"))
    pair_w, pair_h = 64 * 2 * 2 + 4 * 2, 64 * 2 + 12 * 2
    gap = 6 * 2
    assert grid.shape == (2 * pair_h + gap, 2 * pair_w + gap, 3)  # 3 pairs, 2 per row
    det_x0, top = 64 * 2 + 4 * 2, 12 * 2  # the detection panel of the first pair
    # the kept box (label 1) is drawn at twice its coordinates: its right edge, below the label tag
    assert tuple(grid[top + 2 * 25, det_x0 + 2 * 40]) == PALETTE[1]
    # the box under the threshold is not drawn (label 2's colour nowhere on that panel)
    panel = grid[top : top + 128, det_x0 : det_x0 + 128].reshape(-1, 3)
    assert not (panel == np.array(PALETTE[2])).all(1).any()
    # ground truth drawn on the left panel: every box's colour appears there
    with open(data / "annotations" / "val.json") as f:
        coco = json.load(f)
    left = grid[top : top + 128, :128].reshape(-1, 3)
    for a in [a for a in coco["annotations"] if a["image_id"] == 0]:
        assert (left == np.array(PALETTE[a["category_id"] - 1])).all(1).any()


def test_refuses_bad_arguments(data, tmp_path):
    pkl = tmp_path / "r.pkl"
    _results(pkl, [[], [], []])
    ann = str(data / "annotations" / "val.json")
    with pytest.raises(ValueError, match="image_ids"):
        draw_detection_grid(str(pkl), ann, str(data), str(tmp_path / "g.png"), image_ids=[99])
    with pytest.raises(ValueError, match="scale"):
        draw_detection_grid(str(pkl), ann, str(data), str(tmp_path / "g.png"), scale=0)
    with pytest.raises(ValueError, match="score_thr"):
        draw_detection_grid(str(pkl), ann, str(data), str(tmp_path / "g.png"), score_thr=2)
    assert not (tmp_path / "g.png").exists()


def test_dataset_grid_draws_every_box_in_its_tile(data, tmp_path):
    ann = data / "annotations" / "val.json"
    out = draw_dataset_grid(str(ann), str(data), str(tmp_path / "d.png"), image_ids=[0, 1, 2], scale=2, columns=2)
    grid = np.asarray(Image.open(out).convert("RGB"))
    tile, gap = 64 * 2, 4
    assert grid.shape == (2 * tile + gap, 2 * tile + gap, 3)  # 3 tiles, 2 per row
    with open(ann) as f:
        coco = json.load(f)
    cats = sorted(c["id"] for c in coco["categories"])
    for k in range(3):
        x0, y0 = (k % 2) * (tile + gap), (k // 2) * (tile + gap)
        for a in [a for a in coco["annotations"] if a["image_id"] == k]:
            x, y, w, h = a["bbox"]
            color = PALETTE[cats.index(a["category_id"])]
            # the box's colour inside its region, at twice the annotation's coordinates, in its own tile
            ys = slice(y0 + int(2 * y), y0 + min(int(2 * (y + h)), tile - 1) + 1)
            xs = slice(x0 + int(2 * x), x0 + min(int(2 * (x + w)), tile - 1) + 1)
            assert (grid[ys, xs] == np.array(color)).all(-1).any()
    # the fourth slot of the 2 x 2 grid stays empty
    assert (grid[tile + gap :, tile + gap :] == 255).all()


def test_dataset_grid_refuses_bad_arguments(data, tmp_path):
    ann = str(data / "annotations" / "val.json")
    with pytest.raises(ValueError, match="image_ids"):
        draw_dataset_grid(ann, str(data), str(tmp_path / "d.png"), image_ids=[99])
    with pytest.raises(ValueError, match="scale"):
        draw_dataset_grid(ann, str(data), str(tmp_path / "d.png"), scale=0)
    with pytest.raises(ValueError, match="columns"):
        draw_dataset_grid(ann, str(data), str(tmp_path / "d.png"), columns=0)
    assert not (tmp_path / "d.png").exists()
