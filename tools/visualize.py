"""Pictures of what the deformable layers learned, for one image and one or more models.

    python tools/visualize.py --image IMG --model NAME CONFIG CHECKPOINT [--model NAME2 CONFIG2 CKPT2 ...]
                              [--stage 4] [--units auto | y,x [y,x ...]] [--out results/vis.png]

For each model (one row, side by side in the layout of the DCNv2 paper's figure):
  1. the effective sampling locations of the chosen units through the stacked 3x3 convs
     of a backbone stage (regular convs give the regular grid), coloured and sized by
     the product of the modulation along each path;
  2. the effective receptive field of the first unit: |d activation / d pixel|;
  3. for the top detections, where each RoI-pooling bin sampled after its learned
     offset (arrows from the regular bin centre), coloured by its modulation.
Units are pixel positions (y,x in the image) or, with ``auto``, the centres of the
top detections. Works on any mmdet model built from our layers, on the CPU.
"""

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_model(config, checkpoint):
    import mmdcnv2  # noqa: F401
    from mmdet.apis import init_detector

    return init_detector(config, checkpoint, device="cpu")


def stage_convs(model, stage):
    """The 3x3 convs of a backbone stage, bottom first (conv2 of every block)."""
    layer = getattr(model.backbone, f"layer{stage}")
    return [(f"backbone.layer{stage}.{i}.conv2", blk.conv2) for i, blk in enumerate(layer)]


def analyse(model, image_path, stage, units, top_k=3):
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg
    from mmengine.dataset import pseudo_collate

    from mmdcnv2.ops import DeformConv2dPack, DeformRoIPoolPack, ModulatedDeformConv2dPack
    from mmdcnv2.visualization import (
        DCNRecorder,
        LayerGeometry,
        effective_receptive_field,
        effective_sampling_points,
        roi_bin_centres,
    )

    pipeline = Compose(get_test_pipeline_cfg(model.cfg))
    batch = model.data_preprocessor(pseudo_collate([pipeline(dict(img_path=image_path, img_id=0))]), False)
    inputs, samples = batch["inputs"], batch["data_samples"]
    convs = stage_convs(model, stage)
    sizes = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: sizes.__setitem__(n, (i[0].shape[-2:], o.shape[-2:])))
        for n, m in convs
    ]
    rec = DCNRecorder(model)
    with torch.no_grad():
        result = model.predict(inputs, samples)[0]
    for h in hooks:
        h.remove()
    geoms = []
    for n, m in convs:
        if isinstance(m, (DeformConv2dPack, ModulatedDeformConv2dPack)):
            geoms += rec.geometry([n])
        else:  # a regular conv: zero offsets, no modulation
            k = m.kernel_size
            geoms.append(
                LayerGeometry(torch.zeros(2 * k[0] * k[1], *sizes[n][1]), None, k, m.stride, m.padding, m.dilation)
            )
    in_grid, out_grid = sizes[convs[0][0]][0], sizes[convs[-1][0]][1]
    H, W = inputs.shape[-2:]
    s_in, s_out = H / in_grid[0], H / out_grid[0]
    scale = np.array(samples[0].metainfo.get("scale_factor", (1.0, 1.0)))[::-1]  # (y, x)
    det = result.pred_instances
    det = det[det.scores.argsort(descending=True)[:top_k]]
    if units == "auto":
        b = det.bboxes.numpy()
        units_img = [((y1 + y2) / 2, (x1 + x2) / 2) for x1, y1, x2, y2 in b] or [(H / 2 / scale[0], W / 2 / scale[1])]
    else:
        units_img = units
    out = dict(points=[], weights=[], units=units_img, det=det, bins=[])
    for uy, ux in units_img:
        gy = min(max(round((uy * scale[0] + 0.5) / s_out - 0.5), 0), out_grid[0] - 1)
        gx = min(max(round((ux * scale[1] + 0.5) / s_out - 0.5), 0), out_grid[1] - 1)
        pts, w = effective_sampling_points(geoms, (gy, gx))
        img_pts = ((pts.numpy() + 0.5) * s_in - 0.5) / scale
        out["points"].append(img_pts)
        out["weights"].append(w.numpy())
    gy, gx = [
        min(max(round((v * sc + 0.5) / s_out - 0.5), 0), n - 1) for v, sc, n in zip(units_img[0], scale, out_grid)
    ]
    feat_fn = lambda x: model.backbone(x)[stage - 1]  # noqa: E731
    erf = effective_receptive_field(feat_fn, inputs, (gy, gx)).numpy()
    out["erf"] = erf[: int(round(H / scale[0])) if scale[0] >= 1 else None]
    out["erf_scale"] = scale
    extractor = getattr(getattr(model, "roi_head", None), "bbox_roi_extractor", None)
    layers = getattr(extractor, "roi_layers", None)
    if layers is not None and len(det) and isinstance(layers[0], DeformRoIPoolPack):
        # the bins of each detection, through the RoI layer of the level mmdet assigns it to
        from mmdet.structures.bbox import bbox2roi

        from mmdcnv2.ops import DeformRoIPool, ModulatedDeformRoIPoolPack

        with torch.no_grad():
            feats = model.extract_feat(inputs)[: extractor.num_inputs]
            rois = bbox2roi([det.bboxes * torch.tensor([scale[1], scale[0]] * 2, dtype=det.bboxes.dtype)])
            levels = extractor.map_roi_levels(rois, len(feats))
            for i in range(len(det)):
                pool = layers[int(levels[i])]
                pooled = DeformRoIPool.forward(pool, feats[int(levels[i])], rois[i : i + 1])
                offset = pool._offset(pooled)[0]
                mask = (
                    pool.mask_fc(pooled.flatten(1)).view(*pool.output_size)
                    if isinstance(pool, ModulatedDeformRoIPoolPack)
                    else None
                )
                moved, base = roi_bin_centres(
                    rois[i, 1:] / torch.tensor([scale[1], scale[0]] * 2), offset, pool.output_size, pool.gamma
                )
                out["bins"].append((moved.numpy(), base.numpy(), None if mask is None else mask.numpy()))
    rec.remove()
    return out


def draw(rows, image_path, out_path, stage):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    plt.rcParams["axes.titlesize"] = 10
    img = np.asarray(Image.open(image_path).convert("RGB"))
    fig, axes = plt.subplots(len(rows), 3, figsize=(16, 5 * len(rows)), squeeze=False)
    for (name, r), ax in zip(rows, axes):
        ax[0].imshow(img)
        sc = None
        for pts, w, (uy, ux) in zip(r["points"], r["weights"], r["units"]):
            order = np.argsort(w)
            sc = ax[0].scatter(
                pts[order, 1],
                pts[order, 0],
                c=w[order],
                s=10 + 40 * w[order] / max(w.max(), 1e-9),
                cmap="viridis",
                vmin=0,
                vmax=max(1e-9, max(x.max() for x in r["weights"])),
                edgecolors="white",
                linewidths=0.4,
                alpha=0.9,
            )
            ax[0].plot(ux, uy, marker="*", color="red", markersize=14, markeredgecolor="white")
        if sc is not None:
            fig.colorbar(sc, ax=ax[0], fraction=0.046, pad=0.02, label="modulation (product along the path)")
        inside = np.mean(
            [
                ((p[:, 0] >= 0) & (p[:, 0] < img.shape[0]) & (p[:, 1] >= 0) & (p[:, 1] < img.shape[1])).mean()
                for p in r["points"]
            ]
        )
        ax[0].set_title(
            f"{name}: sampling locations, stage c{stage + 1}\n"
            f"{len(r['points'][0])} points per unit (red star), {100 * inside:.0f}% on the image"
        )
        ax[1].imshow(img)
        erf = r["erf"][: img.shape[0], : img.shape[1]]
        ax[1].imshow(erf / max(erf.max(), 1e-12), cmap="inferno", alpha=0.65, extent=(0, erf.shape[1], erf.shape[0], 0))
        uy, ux = r["units"][0]
        ax[1].plot(ux, uy, marker="*", color="cyan", markersize=14, markeredgecolor="black")
        ax[1].set_title(f"{name}: effective receptive field\n|d activation / d pixel| of the starred unit")
        ax[2].imshow(img)
        det = r["det"]
        for k, box in enumerate(det.bboxes.numpy()):
            x1, y1, x2, y2 = box
            ax[2].add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="white", lw=1.2))
            if k < len(r["bins"]):
                moved, base, mask = r["bins"][k]
                c = mask.reshape(-1) if mask is not None else "yellow"
                ax[2].quiver(
                    base[..., 0].ravel(),
                    base[..., 1].ravel(),
                    (moved - base)[..., 0].ravel(),
                    (moved - base)[..., 1].ravel(),
                    angles="xy",
                    scale_units="xy",
                    scale=1,
                    width=0.003,
                    color="white",
                    alpha=0.7,
                )
                ax[2].scatter(
                    moved[..., 0].ravel(),
                    moved[..., 1].ravel(),
                    c=c,
                    cmap="viridis",
                    vmin=0,
                    vmax=1,
                    s=12,
                    edgecolors="black",
                    linewidths=0.3,
                )
        ax[2].set_title(
            f"{name}: RoI-pooling bins of the top detections\n(arrow: regular centre -> learned; colour: modulation)"
            if r["bins"]
            else f"{name}: top detections (no deformable RoI pooling)"
        )
        for a in ax:
            a.set_xlim(0, img.shape[1])
            a.set_ylim(img.shape[0], 0)
            a.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def visualize(models, image, stage=4, units="auto", out="results/vis.png"):
    """models: list of (name, config, checkpoint). Returns the PNG's path."""
    rows = []
    for name, cfg, ckpt in models:
        model = load_model(cfg, ckpt)
        rows.append((name, analyse(model, image, stage, units)))
    return draw(rows, image, out, stage)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--model", nargs=3, action="append", required=True, metavar=("NAME", "CONFIG", "CHECKPOINT"))
    p.add_argument("--stage", type=int, default=4, help="backbone stage 1-4 (4 = c5)")
    p.add_argument("--units", nargs="+", default=["auto"], help="'auto' or pixel positions y,x")
    p.add_argument("--out", default="results/vis.png")
    a = p.parse_args()
    units = "auto" if a.units == ["auto"] else [tuple(float(v) for v in u.split(",")) for u in a.units]
    print("wrote", visualize(a.model, a.image, a.stage, units, a.out))


if __name__ == "__main__":
    main()
