"""Ground truth beside detections, for a few images of a COCO-format dataset, enlarged.

    draw_detection_grid("work/results.pkl", "data/shapes/annotations/val.json", "data/shapes",
                        "work/detections.png", image_ids=(0, 1, 2, 3), scale=2)

``results.pkl`` is what mmdet's test script writes with ``--out`` (a list with one dict per
image: ``img_id`` and ``pred_instances`` with ``bboxes`` (x1, y1, x2, y2 in original image
pixels), ``scores`` and ``labels``).
"""

import json
import os
import pickle
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(220, 20, 60), (0, 130, 230), (250, 170, 30), (0, 160, 80), (150, 60, 200), (255, 255, 255)]


def _as_numpy(v):
    return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed size
        return ImageFont.load_default()


def _draw_boxes(im, boxes, labels, names, scale, scores=None):
    draw = ImageDraw.Draw(im)
    font = _font(7 * scale)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        color = PALETTE[int(label) % len(PALETTE)]
        x1, y1, x2, y2 = [float(v) * scale for v in box]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=scale)
        text = names[int(label)] + ("" if scores is None else f" {float(scores[i]):.2f}")
        tw, th = draw.textbbox((0, 0), text, font=font)[2:]
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1 + 1
        draw.rectangle([x1, ty, x1 + tw + 3, ty + th + 2], fill=color)
        draw.text((x1 + 2, ty), text, fill=(255, 255, 255) if sum(color) < 500 else (0, 0, 0), font=font)


def draw_detection_grid(
    results_pkl: str,
    ann_file: str,
    img_root: str,
    out_path: str,
    image_ids: Optional[Sequence[int]] = None,
    num_images: int = 4,
    scale: int = 2,
    score_thr: float = 0.3,
    columns: int = 2,
) -> str:
    """Writes one picture: for each image, its ground truth (left) beside the detections with a
    score of at least ``score_thr`` (right), every image enlarged ``scale`` times, in a grid of
    ``columns`` pairs per row. Returns ``out_path``. ``image_ids`` default: the first
    ``num_images`` images of ``ann_file``."""
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if not 0 <= score_thr <= 1:
        raise ValueError(f"score_thr must be in [0, 1], got {score_thr!r}")
    with open(ann_file) as f:
        coco = json.load(f)
    with open(results_pkl, "rb") as f:
        results = pickle.load(f)
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    cat_index = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    images = {im["id"]: im for im in coco["images"]}
    ids = list(image_ids) if image_ids is not None else [im["id"] for im in coco["images"][:num_images]]
    missing = [i for i in ids if i not in images]
    if missing:
        raise ValueError(f"image_ids not in {ann_file}: {missing}")
    preds = {int(r["img_id"]): r["pred_instances"] for r in results}
    panels = []
    for img_id in ids:
        info = images[img_id]
        base = Image.open(os.path.join(img_root, info["file_name"])).convert("RGB")
        base = base.resize((base.width * scale, base.height * scale), Image.BICUBIC)
        gt = base.copy()
        anns = [a for a in coco["annotations"] if a["image_id"] == img_id]
        _draw_boxes(
            gt,
            [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]) for a in anns],
            [cat_index[a["category_id"]] for a in anns],
            names,
            scale,
        )
        det = base.copy()
        if img_id in preds:
            p = preds[img_id]
            scores = _as_numpy(p["scores"])
            keep = scores >= score_thr
            _draw_boxes(det, _as_numpy(p["bboxes"])[keep], _as_numpy(p["labels"])[keep], names, scale, scores[keep])
        pair = Image.new("RGB", (base.width * 2 + 4 * scale, base.height + 12 * scale), (255, 255, 255))
        pair.paste(gt, (0, 12 * scale))
        pair.paste(det, (base.width + 4 * scale, 12 * scale))
        d = ImageDraw.Draw(pair)
        font = _font(8 * scale)
        d.text((2, 1), f"{info['file_name']}: ground truth", fill=(0, 0, 0), font=font)
        d.text((base.width + 6 * scale, 1), f"detections (score >= {score_thr:g})", fill=(0, 0, 0), font=font)
        panels.append(pair)
    columns = max(1, min(columns, len(panels)))
    rows = (len(panels) + columns - 1) // columns
    pw, ph = max(p.width for p in panels), max(p.height for p in panels)
    gap = 6 * scale
    grid = Image.new("RGB", (columns * pw + (columns - 1) * gap, rows * ph + (rows - 1) * gap), (255, 255, 255))
    for i, p in enumerate(panels):
        grid.paste(p, ((i % columns) * (pw + gap), (i // columns) * (ph + gap)))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    grid.save(out_path)
    return out_path


def draw_dataset_grid(
    ann_file: str,
    img_root: str,
    out_path: str,
    image_ids: Optional[Sequence[int]] = None,
    num_images: int = 8,
    scale: int = 2,
    columns: int = 4,
) -> str:
    """Writes one picture of a COCO-format dataset: ``num_images`` images (or ``image_ids``) with
    their ground-truth boxes, class names and polygon outlines, enlarged ``scale`` times, in a grid
    of ``columns``. Returns ``out_path``."""
    for name, v in (("num_images", num_images), ("scale", scale), ("columns", columns)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    with open(ann_file) as f:
        coco = json.load(f)
    images = {im["id"]: im for im in coco["images"]}
    ids = list(image_ids) if image_ids is not None else sorted(images)[:num_images]
    missing = [i for i in ids if i not in images]
    if missing:
        raise ValueError(f"image_ids: {missing} not in {ann_file}")
    if not ids:
        raise ValueError("image_ids: nothing to draw")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    index = {c["id"]: i for i, c in enumerate(cats)}
    tiles = []
    for i in ids:
        info = images[i]
        im = Image.open(os.path.join(img_root, info["file_name"])).convert("RGB")
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        anns = [a for a in coco["annotations"] if a["image_id"] == i]
        draw = ImageDraw.Draw(im)
        for a in anns:
            color = PALETTE[index[a["category_id"]] % len(PALETTE)]
            for poly in a.get("segmentation", []):
                pts = [(poly[k] * scale, poly[k + 1] * scale) for k in range(0, len(poly) - 1, 2)]
                draw.line(pts + pts[:1], fill=color, width=1)
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        _draw_boxes(im, boxes, [index[a["category_id"]] for a in anns], names, scale)
        tiles.append(im)
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    cols = min(columns, len(tiles))
    grid = Image.new("RGB", (cols * w + (cols - 1) * 4, rows * h + (rows - 1) * 4), (255, 255, 255))
    for k, t in enumerate(tiles):
        grid.paste(t, ((k % columns) * (w + 4), (k // columns) * (h + 4)))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    grid.save(out_path)
    return out_path
