"""Writes the embedded synthetic dataset (COCO format): python tools/make_shapes.py [--out data/shapes]."""

import argparse

from mmdcnv2.datasets import make_shapes_dataset
from mmdcnv2.datasets.shapes import NUM_TRAIN


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="data/shapes")
    p.add_argument("--num-train", type=int, default=NUM_TRAIN)
    p.add_argument("--num-val", type=int, default=60)
    p.add_argument("--size", type=int, default=192, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    paths = make_shapes_dataset(a.out, a.num_train, a.num_val, a.size, a.seed)
    print("wrote", ", ".join(paths.values()))


if __name__ == "__main__":
    main()
