"""Pretrains the shapes configs' backbone (ResNet-18 at half width) as a crop classifier.

    python tools/pretrain_backbone.py [--steps 2400] [--batch-size 64] [--out checkpoints/...pth]

The embedded dataset's own generator (mmdcnv2.datasets.shapes.make_crop) draws the crops:
one of the 5 shape classes under the detection images' warps, occlusion and clutter, or a
background/clutter crop (6 classes). Every crop is new (no epoch, no overfitting to a fixed
set); the validation crops come from a seed of their own. The role ImageNet plays for
mmdetection's configs: the detector's backbone starts from these weights
(``init_cfg=dict(type='Pretrained', checkpoint=...)``), and its DCN layers load the plain
convolution weights.

Writes the backbone's state dict in mmdet ResNet keys, in float16, with the accuracy and the
command line under ``meta``. An existing --out is never overwritten.
"""

import argparse
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("checkpoints", "resnet18-half_shapes-pretrained.pth")
# mmdet's data_preprocessor of the shapes configs (RGB order)
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def to_tensor(im):
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return (x - MEAN) / STD


class Crops(torch.utils.data.IterableDataset):
    """An endless stream of (crop, label); worker w of ``seed`` draws RandomState([seed, w, i])."""

    def __init__(self, seed, size, scene):
        self.seed, self.size, self.scene = seed, size, scene

    def __iter__(self):
        from mmdcnv2.datasets.shapes import make_crop

        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        i = 0
        while True:
            im, label = make_crop(np.random.RandomState([self.seed, worker, i]), self.size, self.scene)
            i += 1
            yield to_tensor(im), label


def fixed_set(seed, num, size, scene):
    from mmdcnv2.datasets.shapes import make_crop

    xs, ys = [], []
    for i in range(num):
        im, label = make_crop(np.random.RandomState([seed, 1000, i]), size, scene)
        xs.append(to_tensor(im))
        ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


class Classifier(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        from mmdcnv2.models.backbones.resnet import DCNResNet

        # the shapes configs' backbone (configs/shapes/_base_shapes.py), every stage plain
        self.backbone = DCNResNet(
            depth=18,
            base_channels=32,
            num_stages=4,
            out_indices=(3,),
            frozen_stages=-1,
            norm_cfg=dict(type="BN", requires_grad=True),
            norm_eval=False,
            style="pytorch",
        )
        self.head = nn.Linear(self.backbone.feat_dim, num_classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.backbone(x)[-1], 1).flatten(1))


@torch.no_grad()
def evaluate(model, xs, ys, batch=200):
    model.eval()
    pred = torch.cat([model(xs[i : i + batch]).argmax(1) for i in range(0, len(xs), batch)])
    model.train()
    return (pred == ys).float().mean().item(), [
        (pred[ys == c] == c).float().mean().item() for c in range(int(ys.max()) + 1)
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="must not exist (default %(default)s)")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=64, help="crop side in pixels")
    p.add_argument(
        "--scene",
        type=int,
        default=128,
        help="objects are drawn at the scale they have in a SCENE-pixel detection image",
    )
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW, cosine schedule after a linear warm-up")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--val", type=int, default=1200, help="validation crops (a seed of their own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="processes drawing crops")
    p.add_argument("--log-every", type=int, default=50)
    a = p.parse_args(argv)
    for name in ("steps", "batch_size", "size", "val", "log_every"):
        if getattr(a, name) < 1:
            sys.exit(f"--{name.replace('_', '-')} must be >= 1")
    if a.size < 32:
        sys.exit("--size must be >= 32 (the backbone downsamples 32x)")
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    if os.path.exists(a.out):
        sys.exit(f"{a.out} exists: choose a new --out (nothing is overwritten)")
    from mmdcnv2.datasets.shapes import CROP_CLASSES

    torch.manual_seed(a.seed)
    t0 = time.time()
    print(f"validation set: {a.val} crops of {a.size}px", flush=True)
    val_x, val_y = fixed_set(a.seed, a.val, a.size, a.scene)
    model = Classifier(len(CROP_CLASSES))
    import logging

    logging.getLogger("mmengine").setLevel(logging.WARNING)  # no per-parameter init report
    model.backbone.init_weights()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    warmup = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (a.steps - warmup))),
    )
    loader = torch.utils.data.DataLoader(
        Crops(a.seed, a.size, a.scene),
        batch_size=a.batch_size,
        num_workers=a.workers,
        persistent_workers=a.workers > 0,
        prefetch_factor=4 if a.workers else None,
    )
    print(
        f"training {a.steps} steps of {a.batch_size} crops ({len(CROP_CLASSES)} classes: {', '.join(CROP_CLASSES)})",
        flush=True,
    )
    model.train()
    t_train, seen, run_loss, run_acc = time.time(), 0, 0.0, 0.0
    for step, (x, y) in enumerate(loader):
        if step == a.steps:
            break
        logits = model(x.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seen += len(y)
        run_loss += loss.item()
        run_acc += (logits.argmax(1) == y).float().mean().item()
        if (step + 1) % a.log_every == 0 or step + 1 == a.steps:
            n = a.log_every if (step + 1) % a.log_every == 0 else (step + 1) % a.log_every
            rate = seen / (time.time() - t_train)
            eta = (a.steps - step - 1) * a.batch_size / rate
            print(
                f"step {step + 1}/{a.steps}  loss {run_loss / n:.3f}  train acc {run_acc / n:.3f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {rate:.0f} crops/s  eta {eta / 60:.1f} min",
                flush=True,
            )
            run_loss = run_acc = 0.0
    acc, per_class = evaluate(model, val_x, val_y)
    minutes = (time.time() - t0) / 60
    print(
        f"validation accuracy {acc:.3f} on {a.val} crops; per class: "
        + ", ".join(f"{n} {v:.3f}" for n, v in zip(CROP_CLASSES, per_class)),
        flush=True,
    )
    meta = dict(
        accuracy=acc,
        per_class=dict(zip(CROP_CLASSES, per_class)),
        val_crops=a.val,
        command="python tools/pretrain_backbone.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        steps=a.steps,
        batch_size=a.batch_size,
        crop_size=a.size,
        scene=a.scene,
        seed=a.seed,
        minutes=round(minutes, 1),
        torch=str(torch.__version__),
        machine=f"{os.cpu_count()}-core {platform.machine()} CPU",
        date=time.strftime("%Y-%m-%d"),
        arch="mmdcnv2.DCNResNet depth=18 base_channels=32 (ResNet-18 at half width), mmdet ResNet keys",
    )
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.backbone.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp = a.out + ".tmp"
    torch.save(dict(state_dict=state, meta=meta), tmp)
    os.replace(tmp, a.out)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 2**20:.1f} MiB, float16) in {minutes:.1f} min", flush=True)


if __name__ == "__main__":
    main()
