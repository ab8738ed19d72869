"""The synthetic dataset generator: deterministic, valid COCO, geometry in the annotations."""

import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("shapely")

from mmdcnv2.datasets import SHAPES_CLASSES, make_shapes_dataset  # noqa: E402


def test_writes_valid_deterministic_coco(tmp_path):
    a = make_shapes_dataset(str(tmp_path / "a"), num_train=6, num_val=3, size=96, seed=7, progress=None)
    b = make_shapes_dataset(str(tmp_path / "b"), num_train=6, num_val=3, size=96, seed=7, progress=None)
    for split in ("train", "val"):
        ja, jb = (json.load(open(p[split])) for p in (a, b))
        assert ja == jb  # same seed, same annotations
        assert [c["name"] for c in ja["categories"]] == list(SHAPES_CLASSES)
        for im in ja["images"]:
            pa = np.asarray(Image.open(tmp_path / "a" / im["file_name"]))
            pb = np.asarray(Image.open(tmp_path / "b" / im["file_name"]))
            assert pa.shape == (96, 96, 3) and np.array_equal(pa, pb)
        assert len(ja["annotations"]) >= len(ja["images"])
        for ann in ja["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 96.01 and y + h <= 96.01 and w > 0 and h > 0
            assert 0 < ann["area"] <= w * h + 1e-6
            assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in ann["segmentation"])
    c = make_shapes_dataset(str(tmp_path / "c"), num_train=6, num_val=3, size=96, seed=8, progress=None)
    assert json.load(open(c["train"])) != json.load(open(a["train"]))


def test_loads_with_pycocotools_and_reuses_existing(tmp_path):
    from pycocotools.coco import COCO

    paths = make_shapes_dataset(str(tmp_path), num_train=4, num_val=2, size=64, progress=None)
    coco = COCO(paths["train"])
    ann = coco.loadAnns(coco.getAnnIds())[0]
    mask = coco.annToMask(ann)
    assert mask.sum() == pytest.approx(ann["area"], rel=0.25)
    mtime = os.path.getmtime(paths["train"])
    make_shapes_dataset(str(tmp_path), num_train=4, num_val=2, size=64, progress=None)
    assert os.path.getmtime(paths["train"]) == mtime


def test_never_overwrites_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        make_shapes_dataset(str(tmp_path), num_train=2, num_val=1, progress=None)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_hard_variant_is_another_deterministic_split_with_smaller_objects_and_more_occlusion(tmp_path):
    from mmdcnv2.datasets.shapes import VARIANTS, make_image

    a = make_shapes_dataset(str(tmp_path / "a"), num_train=2, num_val=3, size=96, progress=None, variant="hard")
    b = make_shapes_dataset(str(tmp_path / "b"), num_train=2, num_val=3, size=96, progress=None, variant="hard")
    d = make_shapes_dataset(str(tmp_path / "d"), num_train=2, num_val=3, size=96, progress=None)
    for split in ("train", "val"):
        assert json.load(open(a[split])) == json.load(open(b[split]))
        assert json.load(open(a[split]))["annotations"] != json.load(open(d[split]))["annotations"]
    assert json.load(open(tmp_path / "a" / "dataset.json"))["variant"] == "hard"
    assert "variant" not in json.load(open(tmp_path / "d" / "dataset.json"))

    def stats(variant, n=40):
        count, areas = 0, []
        for i in range(n):
            _, objects = make_image(np.random.RandomState([5, 1, i]), 192, variant)
            count += len(objects)
            for _, parts, visible in objects:
                if parts:
                    areas.append(visible.area)
        return count / n, np.asarray(areas)

    n_default, areas_default = stats("default")
    n_hard, areas_hard = stats("hard")
    assert n_hard > n_default  # up to 6 objects per image against 5
    assert (areas_hard < 32**2).mean() > (areas_default < 32**2).mean() + 0.1  # COCO "small"
    assert VARIANTS["hard"]["min_visible"] < VARIANTS["default"]["min_visible"]


def test_hard_split_drawn_with_other_settings_is_rewritten(tmp_path, monkeypatch):
    """The hard variant's stamp holds its drawing settings: a split written before they changed is drawn
    again (at its own sizes), not reused."""
    from mmdcnv2.datasets import shapes

    root = str(tmp_path / "h")
    make_shapes_dataset(root, num_train=1, num_val=1, size=64, progress=None, variant="hard")
    before = open(os.path.join(root, "annotations", "train.json")).read()
    said = []
    make_shapes_dataset(root, num_train=1, num_val=1, size=64, progress=said.append, variant="hard")
    assert said == [f"reusing the dataset in {root}"]
    monkeypatch.setitem(shapes.VARIANTS, "hard", dict(shapes.VARIANTS["hard"], max_objects=1, clutter=(0, 1)))
    said.clear()
    make_shapes_dataset(root, num_train=1, num_val=1, size=64, progress=said.append, variant="hard")
    assert any("rewriting" in m for m in said)
    assert open(os.path.join(root, "annotations", "train.json")).read() != before


def test_generator_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        make_shapes_dataset(str(tmp_path / "x"), num_train=1, num_val=1, variant="harder", progress=None)
    with pytest.raises(ValueError, match="num_val"):
        make_shapes_dataset(str(tmp_path / "x"), num_train=1, num_val=0, progress=None)
    assert not os.path.exists(tmp_path / "x")
