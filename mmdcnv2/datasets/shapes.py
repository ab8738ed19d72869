"""A deterministic synthetic detection and instance-segmentation dataset, in COCO format.

Built so that geometry matters: five object classes whose silhouettes differ in
shape, not colour, drawn under random rotation, scale, aspect ratio, shear and a
smooth non-rigid warp, over textured backgrounds with clutter (strokes and blobs
that are not objects), partly occluding each other. Every annotation is the
visible part of its object: polygons (``segmentation``), box and area.

    make_shapes_dataset("data/shapes", num_train=1000, num_val=500)
    make_shapes_dataset("data/shapes-hard", variant="hard")

writes ``train/*.png``, ``val/*.png`` and ``annotations/{train,val}.json``.

The ``hard`` variant draws from the same five classes with geometry deciding more: a wider scale
range down to small objects, stronger aspect changes, shear and non-rigid warps, thin variants of the
cross, the arrow and the crescent, more objects per image with more of them hidden, and clutter made
of thin curved strokes that look like object parts (see ``VARIANTS``).
"""

import json
import math
import os
from typing import Dict, List, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from shapely.geometry import MultiPolygon, Polygon
from shapely.ops import unary_union

SHAPES_CLASSES = ("triangle", "star", "cross", "arrow", "crescent")
# the main job's and the ablation's training split, and the validation split (image i of a split
# depends on the variant, the seed, the split and i only, so the first 60 of the 500 validation
# images are the 60 of the earlier, smaller split)
NUM_TRAIN = 1000
NUM_VAL = 500

# How objects are drawn. "default" is the embedded dataset; "hard" makes geometry decide more.
VARIANTS = {
    "default": dict(
        scale=(0.09, 0.24),  # outline radius as a share of the image side, uniform
        log_scale=False,
        aspect=0.45,  # log aspect ratio, uniform in +-
        shear=0.4,
        warp=0.12,  # amplitude of the sinusoidal displacement field, in outline units
        thin=0.0,  # probability of the thin version of the cross, arrow and crescent
        max_objects=5,
        min_visible=0.6,  # every object keeps at least this share of its area visible
        clutter=(3, 9),
        curved_clutter=0.0,  # share of clutter strokes drawn as thin arcs
    ),
    "hard": dict(
        scale=(0.06, 0.32),  # log-uniform: objects from about 23 to 120 px across at 192 px
        log_scale=True,
        aspect=0.65,
        shear=0.5,
        warp=0.22,
        thin=0.4,
        max_objects=6,
        min_visible=0.55,
        clutter=(4, 10),
        curved_clutter=0.4,
    ),
}


def _base_outline(name: str, thin: bool = False) -> np.ndarray:
    """The class's outline in the unit square around the origin, as (n, 2) x, y points.

    ``thin``: the cross with narrow arms, the arrow with a narrow shaft and head, the crescent as a
    narrow curved band (the other classes have no thin version)."""
    if name == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad([90, 210, 330])]
    elif name == "star":
        pts = [
            ((1.0 if i % 2 == 0 else 0.42) * math.cos(a), (1.0 if i % 2 == 0 else 0.42) * math.sin(a))
            for i, a in enumerate(np.deg2rad(90 + 36 * np.arange(10)))
        ]
    elif name == "cross":
        a, b = 1.0, (0.14 if thin else 0.33)
        pts = [
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
        ]
    elif name == "arrow":
        w, h = (0.1, 0.4) if thin else (0.28, 0.7)
        pts = [(-1.0, -w), (0.15, -w), (0.15, -h), (1.0, 0.0), (0.15, h), (0.15, w), (-1.0, w)]
    elif name == "crescent":
        outer = Polygon([(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)])
        inner = Polygon(
            [
                (d + r * math.cos(t), r * math.sin(t))
                for d, r in [(0.22, 0.93) if thin else (0.45, 0.85)]
                for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)
            ]
        )
        shape = outer.difference(inner)
        if isinstance(shape, MultiPolygon):
            shape = max(shape.geoms, key=lambda g: g.area)
        pts = list(shape.exterior.coords)[:-1]
    else:
        raise ValueError(f"unknown shape class {name!r}")
    return np.asarray(pts, dtype=np.float64)


def _densify(pts: np.ndarray, step: float = 0.08) -> np.ndarray:
    out = []
    for p, q in zip(pts, np.roll(pts, -1, axis=0)):
        n = max(1, int(np.linalg.norm(q - p) / step))
        out += [p + (q - p) * t for t in np.arange(n) / n]
    return np.asarray(out)


def _random_object(rng: np.random.RandomState, cls: int, size: int, v: Optional[Dict] = None) -> np.ndarray:
    """Outline of one object in image coordinates: scaled, stretched, sheared, rotated, warped.

    ``v``: the variant's settings (``VARIANTS``); the default variant draws the same random numbers
    in the same order as it always has."""
    v = v or VARIANTS["default"]
    thin = v["thin"] > 0 and rng.rand() < v["thin"]
    pts = _densify(_base_outline(SHAPES_CLASSES[cls], thin=thin))
    lo, hi = v["scale"]
    scale = (math.exp(rng.uniform(math.log(lo), math.log(hi))) if v["log_scale"] else rng.uniform(lo, hi)) * size
    aspect = math.exp(rng.uniform(-v["aspect"], v["aspect"]))
    pts = pts * np.array([aspect, 1 / aspect])
    shear = rng.uniform(-v["shear"], v["shear"])
    pts = pts @ np.array([[1.0, 0.0], [shear, 1.0]])
    theta = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = pts @ rot.T
    # smooth non-rigid warp: a low-frequency sinusoidal displacement field
    amp, freq, phase = rng.uniform(0.0, v["warp"]), rng.uniform(1.0, 2.5), rng.uniform(0, 2 * math.pi, size=2)
    pts = pts + amp * np.stack([np.sin(freq * pts[:, 1] + phase[0]), np.sin(freq * pts[:, 0] + phase[1])], axis=1)
    pts = pts * scale
    margin = 0.6 * scale
    centre = rng.uniform(margin, size - margin, size=2)
    return pts + centre


def _background(rng: np.random.RandomState, size: int, v: Optional[Dict] = None) -> Image.Image:
    v = v or VARIANTS["default"]
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(60, 190, size=3)
    grad = rng.uniform(-50, 50, size=(2, 3))
    img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    img = img + rng.normal(0, 12, size=(size, size, 3))
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))
    draw = ImageDraw.Draw(im)
    for _ in range(rng.randint(*v["clutter"])):  # clutter: strokes and blobs that are not objects
        color = tuple(int(c) for c in rng.randint(0, 256, size=3))
        if v["curved_clutter"] > 0 and rng.rand() < v["curved_clutter"]:  # a thin arc, like part of an outline
            c, r = rng.uniform(0, size, size=2), rng.uniform(0.03, 0.15) * size
            start = rng.uniform(0, 360)
            draw.arc(
                [c[0] - r, c[1] - r, c[0] + r, c[1] + r],
                start,
                start + rng.uniform(60, 240),
                fill=color,
                width=int(rng.randint(2, 5)),
            )
        elif rng.rand() < 0.6:
            p = rng.uniform(0, size, size=4)
            draw.line([tuple(p[:2]), tuple(p[2:])], fill=color, width=int(rng.randint(1, 4)))
        else:
            c, r = rng.uniform(0, size, size=2), rng.uniform(2, size * 0.05)
            draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=color)
    return im


def _visible_parts(geom) -> List[Polygon]:
    if geom.is_empty:
        return []
    parts = list(geom.geoms) if hasattr(geom, "geoms") else [geom]
    return [p for p in parts if isinstance(p, Polygon) and p.area >= 4.0]


def make_image(rng: np.random.RandomState, size: int, variant: str = "default"):
    """One image and its objects: list of (class index, visible polygons, visible geometry)."""
    v = VARIANTS[variant]
    im = _background(rng, size, v)
    draw = ImageDraw.Draw(im)
    placed = []  # (cls, full polygon)
    min_area = 40 if variant == "default" else 20
    for _ in range(rng.randint(1, v["max_objects"] + 1)):
        for _try in range(10):
            cls = int(rng.randint(len(SHAPES_CLASSES)))
            poly = Polygon(_random_object(rng, cls, size, v)).buffer(0)
            if poly.is_empty or poly.area < min_area:
                continue
            # keep at least min_visible (60% by default) of every earlier object visible
            ok = all(
                (p.difference(unary_union([q for _, q in placed[i + 1 :]] + [poly]))).area >= v["min_visible"] * p.area
                for i, (_, p) in enumerate(placed)
            )
            if ok:
                placed.append((cls, poly))
                break
    objects = []
    for i, (cls, poly) in enumerate(placed):
        color = tuple(int(c) for c in rng.randint(0, 256, size=3))
        outline = tuple(int(c) for c in rng.randint(0, 256, size=3))
        geoms = [poly] if isinstance(poly, Polygon) else list(poly.geoms)
        for g in geoms:
            draw.polygon([tuple(p) for p in np.asarray(g.exterior.coords)], fill=color, outline=outline)
        later = [q for _, q in placed[i + 1 :]]
        visible = poly.difference(unary_union(later)) if later else poly
        visible = visible.intersection(Polygon([(0, 0), (size, 0), (size, size), (0, size)]))
        objects.append((cls, _visible_parts(visible), visible))
    arr = np.asarray(im).astype(np.float32)
    arr += rng.normal(0, 4, size=arr.shape)  # sensor noise over everything
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), objects


def _write_split(root: str, split: str, num: int, size: int, seed: int, progress, variant: str = "default") -> Dict:
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations = [], []
    for idx in range(num):
        key = [seed, 0 if split == "train" else 1, idx]
        if variant != "default":  # another stream of images, not a redraw of the default's
            key.append(1 + sorted(VARIANTS).index(variant))
        rng = np.random.RandomState(key)
        im, objects = make_image(rng, size, variant)
        name = f"{split}/{idx:06d}.png"
        im.save(os.path.join(root, name))
        images.append(dict(id=idx, file_name=name, width=size, height=size))
        for cls, parts, visible in objects:
            if not parts:
                continue
            x0, y0, x1, y1 = visible.bounds
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=idx,
                    category_id=cls + 1,
                    iscrowd=0,
                    bbox=[round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    area=round(visible.area, 2),
                    segmentation=[
                        [round(float(v), 2) for xy in np.asarray(p.exterior.coords)[:-1] for v in xy] for p in parts
                    ],
                )
            )
        if progress and ((idx + 1) % max(1, num // 10) == 0 or idx + 1 == num):
            progress(f"{split}: {idx + 1}/{num} images")
    return dict(
        images=images,
        annotations=annotations,
        categories=[dict(id=i + 1, name=n) for i, n in enumerate(SHAPES_CLASSES)],
    )


def make_shapes_dataset(
    root: str,
    num_train: int = NUM_TRAIN,
    num_val: int = NUM_VAL,
    size: int = 192,
    seed: int = 0,
    progress: Optional[callable] = print,
    variant: str = "default",
) -> Dict[str, str]:
    """Writes the dataset under ``root`` and returns the paths of the two annotation files.

    The same arguments always give the same files. An existing dataset with the same
    settings is reused; a folder holding anything else is never overwritten. ``variant``:
    ``"default"`` or ``"hard"`` (``VARIANTS``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(sorted(VARIANTS))}, got {variant!r}")
    for name, n in (("num_train", num_train), ("num_val", num_val), ("size", size)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    stamp = dict(generator="mmdcnv2.shapes/1", num_train=num_train, num_val=num_val, size=size, seed=seed)
    if variant != "default":  # the default's stamp stays as it was, so existing datasets are reused
        stamp["variant"] = variant
        # the variant's drawing settings too: a split drawn with earlier settings is rewritten, not reused
        stamp["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(VARIANTS[variant].items())}
    stamp_path = os.path.join(root, "dataset.json")
    ann_dir = os.path.join(root, "annotations")
    paths = {s: os.path.join(ann_dir, f"{s}.json") for s in ("train", "val")}
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp and all(os.path.exists(p) for p in paths.values()):
                if progress:
                    progress(f"reusing the dataset in {root}")
                return paths
    if os.path.isdir(root) and os.listdir(root) and not os.path.exists(stamp_path):
        raise FileExistsError(f"{root} exists and was not written by this generator; choose another folder")
    if os.path.exists(stamp_path) and progress:
        progress(f"rewriting the generated dataset in {root} with other settings")
    os.makedirs(ann_dir, exist_ok=True)
    for split, num in (("train", num_train), ("val", num_val)):
        coco = _write_split(root, split, num, size, seed, progress, variant)
        with open(paths[split], "w") as f:
            json.dump(coco, f)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    return paths


CROP_CLASSES = SHAPES_CLASSES + ("background",)


def make_crop(rng: np.random.RandomState, size: int = 96, scene: int = 192):
    """One classification crop (``size`` x ``size``) and its label, for pretraining a backbone.

    Labels 0-4 are the shape classes: one object at the detection images' scale (drawn as if
    in a ``scene``-pixel image) near the centre, under the same random scale, aspect, shear,
    rotation and warp, over the same textured background and clutter, and in half of the
    crops partly covered by one or two other objects (at least 60% stays visible, as in the
    detection images). Label 5 is background: the background and clutter, sometimes with
    pieces of objects that enter from the border (their centres stay outside the crop).
    """
    im = _background(rng, size)
    draw = ImageDraw.Draw(im)
    label = int(rng.randint(len(CROP_CLASSES)))
    centre = np.array([size / 2, size / 2])

    def place(cls, at):
        pts = _random_object(rng, cls, scene)
        return pts - pts.mean(axis=0) + at

    def paint(pts):
        draw.polygon(
            [tuple(p) for p in pts],
            fill=tuple(int(c) for c in rng.randint(0, 256, size=3)),
            outline=tuple(int(c) for c in rng.randint(0, 256, size=3)),
        )

    if label < len(SHAPES_CLASSES):
        main = place(label, centre + rng.uniform(-0.08, 0.08, size=2) * size)
        paint(main)
        if rng.rand() < 0.5:
            main_poly = Polygon(main).buffer(0)
            cover = None
            for _ in range(rng.randint(1, 3)):
                direction = rng.uniform(0, 2 * math.pi)
                dist = rng.uniform(0.35, 0.6) * size
                other = place(
                    int(rng.randint(len(SHAPES_CLASSES))),
                    centre + dist * np.array([math.cos(direction), math.sin(direction)]),
                )
                poly = Polygon(other).buffer(0)
                union = poly if cover is None else cover.union(poly)
                if main_poly.difference(union).area >= 0.6 * main_poly.area:
                    paint(other)
                    cover = union
    else:
        for _ in range(rng.randint(0, 3)):
            direction = rng.uniform(0, 2 * math.pi)
            paint(
                place(
                    int(rng.randint(len(SHAPES_CLASSES))),
                    centre + rng.uniform(0.75, 1.0) * size * np.array([math.cos(direction), math.sin(direction)]),
                )
            )
    arr = np.asarray(im).astype(np.float32)
    arr += rng.normal(0, 4, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), label
