"""python bench/targets_throughput.py [--sam-model DIR] [--images 3] [--size 640x480] [--device cpu]

Images/s of our segmentation-target maker vs transformers' ``pipeline("mask-generation")``, both on
the same SAM, the same images and the same settings, measured in this one run; prints the ratio
(goal >= 1.5x). The pipeline gets the pure-torch NMS (its own needs torchvision); every image's masks
are checked identical (outside the timed region); the two sides alternate image by image. Our side is timed up to the finished boundary map
(masks + outlines), the pipeline's only up to its masks, so the ratio is conservative.

Settings: with ``--sam-model`` the paper's (32×32 grid, pred_iou 0.88, stability 0.95, NMS 0.7).
Without it, a tiny random SAM (unimrg.targets.tiny) whose IoU scores sit near 0 and whose logits
are ~1e-5: the default thresholds would keep nothing, so ``pred_iou_thresh`` is set to the
``--iou-pass`` quantile of its scores (default: a third of the candidates pass, an assumed share
for a trained SAM at 0.88) and the stability offset is scaled to the logits. Random-weight masks are
fine textures that cover the whole image; their run-length encoding (which the pipeline does and
we skip) is costlier than for real, blob-like masks: the printed breakdown shows that share.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from unimrg.targets.segmentation import (SegmentationConfig, SegmentationTargetMaker, load_sam,  # noqa: E402
                                         pipeline_kwargs, point_grid, reference_pipeline)
from unimrg.targets.tiny import save_tiny_models  # noqa: E402


def synthetic_images(n: int, w: int, h: int, seed: int = 0) -> list[Image.Image]:
    """Flat-coloured shapes on a gradient, a little noise: photo-sized, deterministic."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
        y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = Image.fromarray((c0 * (1 - x) * (1 - y) + c1 * x * y).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
            box = [x0, y0, x0 + rng.integers(15, w // 2), y0 + rng.integers(15, h // 2)]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
        a = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return out


@torch.inference_mode()
def calibrate(model, processor, image: Image.Image, cfg: SegmentationConfig, iou_pass: float) -> SegmentationConfig:
    """Thresholds for a random-weight SAM: pass ``iou_pass`` of the candidates, scale the stability offset."""
    inputs = processor(images=[image], return_tensors="pt")
    emb = model.get_image_embeddings(inputs["pixel_values"])
    pts = point_grid(image.height, image.width, cfg.points_per_side)[None, :64, None]
    out = model(image_embeddings=emb, input_points=pts, input_labels=torch.ones(pts.shape[:3], dtype=torch.long))
    iou = float(torch.quantile(out.iou_scores.flatten(), 1 - iou_pass))
    return dataclasses.replace(cfg, pred_iou_thresh=max(iou, 1e-12), stability_score_thresh=0.8,
                               stability_score_offset=float(out.pred_masks.std()) * 0.2)


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sam-model", help="local HF SAM folder; default: a tiny random SAM")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--size", default="640x480", help="WxH of the synthetic images")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--iou-pass", type=float, default=1 / 3, help="tiny SAM only: share passing pred_iou")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared machines: 1 is steadier)")
    ap.add_argument("--calibrate", action="store_true", help="random-weight --sam-model (e.g. bench/gpu_suite.py's "
                                                             "SAM-H): calibrate thresholds as for the tiny SAM")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))
    images = synthetic_images(args.images + 1, w, h)          # +1: warm-up

    with tempfile.TemporaryDirectory() as tmp:
        path = args.sam_model or save_tiny_models(tmp)[1]
        model, processor = load_sam(path)
    model = model.eval().to(args.device)
    cfg = SegmentationConfig(points_per_side=args.points_per_side)
    if not args.sam_model or args.calibrate:
        cfg = calibrate(model, processor, images[0], cfg, args.iou_pass)
    ours = SegmentationTargetMaker(model, processor, cfg, args.device)
    pipe = reference_pipeline(model, processor, args.device)
    kwargs = pipeline_kwargs(cfg)

    # the pipeline's filter step includes its per-mask RLE encoding: time it for the breakdown
    filt = pipe.image_processor.filter_masks
    spent = {"filter_masks": 0.0}

    def timed_filter(*a, **k):
        t = time.perf_counter()
        try:
            return filt(*a, **k)
        finally:
            spent["filter_masks"] += time.perf_counter() - t

    pipe.image_processor.filter_masks = timed_filter

    def sync():
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()

    warm = images[0].resize((max(16, w // 4), max(16, h // 4)))
    pipe(warm, **kwargs)                                        # warm-up both (first-call overheads)
    ours.boundary(warm)
    spent["filter_masks"] = 0.0
    # interleaved per image, so that load changes on a shared machine hit both sides alike
    t_pipe = t_ours = 0.0
    ref = []
    for img in images[1:]:
        sync()
        t0 = time.perf_counter()
        ref.append(pipe(img, **kwargs)["masks"])
        sync()
        t1 = time.perf_counter()
        ours.boundary(img)
        sync()
        t_pipe, t_ours = t_pipe + t1 - t0, t_ours + time.perf_counter() - t1

    counts = []
    for img, ref_masks in zip(images[1:], ref):                 # identity, outside the timing
        masks = ours.masks(img)[0].cpu().numpy()
        if len(ref_masks) != len(masks) or not all(np.array_equal(a, b) for a, b in zip(ref_masks, masks)):
            raise SystemExit(f"masks differ from the pipeline's on a {img.size} image: {len(ref_masks)} vs {len(masks)}")
        counts.append(len(masks))
    n = len(images) - 1
    ratio = t_pipe / t_ours
    print(f"SAM: {'tiny random' if not args.sam_model else args.sam_model} on {args.device}, {n} images {w}x{h}, "
          f"{cfg.points_per_side}x{cfg.points_per_side} points, pred_iou {cfg.pred_iou_thresh:.3g}, "
          f"stability {cfg.stability_score_thresh} (offset {cfg.stability_score_offset:.3g}), NMS {cfg.box_nms_thresh}")
    print(f"masks per image (identical in both): {counts}")
    print(f"pipeline  : {n / t_pipe:.3f} images/s ({t_pipe / n:.2f} s/image; filter_masks incl. RLE "
          f"{spent['filter_masks'] / n:.2f} s/image)")
    print(f"ours      : {n / t_ours:.3f} images/s ({t_ours / n:.2f} s/image, incl. boundary maps)")
    print(f"speed-up  : {ratio:.2f}x (goal >= 1.5x)")
    LAST.update(ours_img_s=n / t_ours, pipeline_img_s=n / t_pipe, masks_per_image=counts)
    return ratio


LAST: dict = {}   # the last run's rates, for bench/gpu_suite.py


if __name__ == "__main__":
    main()
