"""Writes the embedded synthetic dataset (COCO format).

python tools/make_shapes.py [--out data/shapes]
python tools/make_shapes.py --hard        # the harder variant, in data/shapes-hard
"""

import argparse

from mmdcnv2.datasets import make_shapes_dataset
from mmdcnv2.datasets.shapes import NUM_TRAIN, NUM_VAL


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="default: data/shapes, or data/shapes-hard with --hard")
    p.add_argument(
        "--hard",
        action="store_true",
        help="the harder variant: small objects, stronger warps, thin classes, more occlusion",
    )
    p.add_argument("--num-train", type=int, default=NUM_TRAIN)
    p.add_argument("--num-val", type=int, default=NUM_VAL)
    p.add_argument("--size", type=int, default=192, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--picture",
        default=None,
        metavar="PNG",
        help="also draw 8 training images with their boxes and outlines into this file",
    )
    a = p.parse_args()
    variant = "hard" if a.hard else "default"
    out = a.out or ("data/shapes-hard" if a.hard else "data/shapes")
    paths = make_shapes_dataset(out, a.num_train, a.num_val, a.size, a.seed, variant=variant)
    print("wrote", ", ".join(paths.values()))
    if a.picture:
        from mmdcnv2.visualization import draw_dataset_grid

        print("wrote", draw_dataset_grid(paths["train"], out, a.picture, num_images=8))


if __name__ == "__main__":
    main()
