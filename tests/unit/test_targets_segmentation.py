"""Segmentation targets (Appendix B.3): exact outlines, torch NMS, masks identical to transformers' pipeline.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_targets_segmentation.py -q
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy.ndimage import binary_erosion

from unimrg.data.loaders import decode_boundary
from unimrg.targets.nms import box_nms
from unimrg.targets.segmentation import (SegmentationConfig, SegmentationTargetMaker, boundary_rgb, decode_seg_png,
                                         encode_seg_png, mask_boundaries, masks_to_boxes, pipeline_kwargs,
                                         point_grid, reference_pipeline)
from unimrg.targets.tiny import build_tiny_sam


def rect(h, w, top, left, bottom, right):
    """(h, w) bool with rows top..bottom and columns left..right (inclusive) set."""
    m = np.zeros((h, w), bool)
    m[top:bottom + 1, left:right + 1] = True
    return m


def outline(h, w, top, left, bottom, right):
    """The 1-pixel inner outline of that rectangle, written out by hand."""
    m = np.zeros((h, w), bool)
    m[top, left:right + 1] = m[bottom, left:right + 1] = True
    m[top:bottom + 1, left] = m[top:bottom + 1, right] = True
    return m


def boundaries(*masks):
    return mask_boundaries(torch.as_tensor(np.stack(masks))).numpy()


# ---------------------------------------------------------------- outlines of known masks
def test_square_outline():
    got = boundaries(rect(10, 12, 2, 3, 6, 7))
    assert np.array_equal(got, outline(10, 12, 2, 3, 6, 7))
    assert got.sum() == 4 * 5 - 4


def test_two_touching_squares_are_outlined_separately():
    a, b = rect(9, 12, 2, 2, 6, 5), rect(9, 12, 2, 6, 6, 9)   # columns 5 and 6 touch
    got = boundaries(a, b)
    expected = outline(9, 12, 2, 2, 6, 5) | outline(9, 12, 2, 6, 6, 9)
    assert np.array_equal(got, expected)
    assert got[4, 5] and got[4, 6] and not got[4, 4] and not got[4, 7]   # a 2-pixel line where they touch
    # the union as ONE mask would have no line there: outlines are per mask
    assert not boundaries(a | b)[4, 5]


def test_mask_touching_the_frame_is_closed_along_the_frame():
    got = boundaries(rect(6, 8, 0, 0, 3, 4))
    assert np.array_equal(got, outline(6, 8, 0, 0, 3, 4))
    assert got[0, :5].all() and got[:4, 0].all()          # the frame counts as outside
    full = boundaries(np.ones((5, 7), bool))
    assert np.array_equal(full, outline(5, 7, 0, 0, 4, 6))


def test_outlines_equal_scipy_erosion_on_random_shapes():
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(6):
        img = Image.new("1", (40, 30))
        d = ImageDraw.Draw(img)
        x, y = rng.integers(-5, 35), rng.integers(-5, 25)
        (d.ellipse if rng.random() < .5 else d.rectangle)([x, y, x + rng.integers(3, 25), y + rng.integers(3, 20)], fill=1)
        masks.append(np.asarray(img, bool))
    expected = np.zeros((30, 40), bool)
    for m in masks:
        expected |= m & ~binary_erosion(m, border_value=0)
    assert np.array_equal(boundaries(*masks), expected)


def test_three_channel_0_255_png_and_loader():
    b = boundaries(rect(10, 12, 2, 3, 6, 7))
    rgb = boundary_rgb(b)
    assert rgb.shape == (10, 12, 3) and rgb.dtype == np.uint8 and set(np.unique(rgb)) == {0, 255}
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    png = encode_seg_png(b)
    assert Image.open(__import__("io").BytesIO(png)).mode == "RGB"   # as unimrg.data.scenes stores seg.png
    assert np.array_equal(decode_seg_png(png) == 255, b)
    square = encode_seg_png(boundaries(rect(12, 12, 2, 3, 6, 7)))             # the trainer's decoder
    assert np.array_equal(decode_boundary(square, 12)[0].bool().numpy(), outline(12, 12, 2, 3, 6, 7))


# ---------------------------------------------------------------- boxes and NMS
def test_masks_to_boxes_inclusive_and_empty():
    m = torch.stack([torch.from_numpy(rect(10, 12, 2, 3, 6, 7)), torch.zeros(10, 12, dtype=torch.bool),
                     torch.from_numpy(rect(10, 12, 9, 11, 9, 11))])
    assert masks_to_boxes(m).tolist() == [[3, 2, 7, 6], [0, 0, 0, 0], [11, 9, 11, 9]]


def test_box_nms_greedy_by_score():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.95, 0.5])
    # IoU(0, 1) = 81 / 119 = 0.68: kept at 0.7, suppressed at 0.5; box 3 duplicates box 0 (IoU 1)
    assert box_nms(boxes, scores, 0.7).tolist() == [2, 0, 1]
    assert box_nms(boxes, scores, 0.5).tolist() == [2, 0]
    assert box_nms(boxes, scores, 1.0).tolist() == [2, 0, 1, 3]


def test_box_nms_threshold_is_strict_and_empty_ok():
    boxes = torch.tensor([[0., 0, 4, 1], [0, 0, 2, 1]])         # IoU exactly 0.5
    assert box_nms(boxes, torch.tensor([1.0, 0.5]), 0.5).tolist() == [0, 1]
    assert box_nms(boxes, torch.tensor([1.0, 0.5]), 0.4999).tolist() == [0]
    assert box_nms(torch.zeros(0, 4), torch.zeros(0), 0.7).tolist() == []
    # a suppressed box does not suppress others (greedy, not transitive): 0 kills 1, 1 would kill 2
    chain = torch.tensor([[0., 0, 10, 10], [0, 0, 10, 14], [0, 0, 10, 18]])
    assert box_nms(chain, torch.tensor([3.0, 2.0, 1.0]), 0.7).tolist() == [0, 2]


# ---------------------------------------------------------------- automatic masks == pipeline
@pytest.fixture(scope="module")
def sam():
    return build_tiny_sam(0)


def test_point_grid_matches_transformers(sam):
    from unimrg.targets.segmentation import sam_image_processor

    img = Image.new("RGB", (70, 45))
    _, pts, _, _ = sam_image_processor().generate_crop_boxes(img, 1024, points_per_crop=5)
    ours = point_grid(45, 70, 5)
    assert pts.dtype == ours.dtype and torch.equal(pts[0, :, 0], ours)


def scene(w=72, h=52):
    img = Image.new("RGB", (w, h), (30, 90, 160))
    d = ImageDraw.Draw(img)
    d.rectangle([5, 20, 35, 48], fill=(200, 40, 40))
    d.ellipse([38, 4, 68, 30], fill=(240, 220, 30))
    return img


CASES = {
    # everything passes the filters; the pipeline's default NMS
    "no-filters": SegmentationConfig(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0,
                                     stability_score_thresh=0.0, box_nms_thresh=0.7),
    # tiny random logits are ~1e-5: a tiny offset makes the stability test bite; the IoU filter
    # (our pre-upsampling shortcut) rejects about half. Random-weight masks are textures over the
    # whole image (every box is the frame), so NMS either keeps one (above) or, at 1.0, all;
    # partial suppression is covered by the NMS tests.
    "filters": SegmentationConfig(points_per_side=4, points_per_batch=5, pred_iou_thresh=1e-12,
                                  stability_score_thresh=0.8, stability_score_offset=2e-6, box_nms_thresh=1.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_masks_identical_to_pipeline(sam, case):
    cfg = CASES[case]
    img = scene()
    ref = reference_pipeline(sam)(img, **pipeline_kwargs(cfg))
    # our upsampling chunks are free (bilinear is elementwise); the decoder's point batch is not:
    # matmul blocking changes float rounding with the batch size, so it must match the pipeline's
    ours_cfg = dataclasses.replace(cfg, upsample_chunk=7)
    masks, scores, boxes = SegmentationTargetMaker(sam, config=ours_cfg).masks(img)
    assert len(ref["masks"]) == masks.shape[0] > 0
    for a, b in zip(ref["masks"], masks):
        assert np.array_equal(a, b.numpy())
    assert torch.equal(ref["scores"], scores)
    if case == "filters":
        assert 1 < masks.shape[0] < 3 * 16                 # some were filtered, several kept


def test_filters_reject_some_candidates(sam):
    """The 'filters' case above really exercises both thresholds (else identity would be trivial)."""
    cfg = CASES["filters"]
    loose = dataclasses.replace(cfg, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    n_all = SegmentationTargetMaker(sam, config=loose).masks(scene())[0].shape[0]
    n_iou = SegmentationTargetMaker(sam, config=dataclasses.replace(loose, pred_iou_thresh=1e-12)).masks(scene())[0].shape[0]
    n_both = SegmentationTargetMaker(sam, config=cfg).masks(scene())[0].shape[0]
    assert n_all == 48 and n_both < n_iou < n_all


def test_target_is_outline_of_kept_masks(sam):
    cfg = CASES["filters"]
    maker = SegmentationTargetMaker(sam, config=cfg)
    img = scene()
    masks, _, _ = maker.masks(img)
    seg = maker(img)
    assert seg.shape == (52, 72, 3) and set(np.unique(seg)) <= {0, 255}
    expected = np.zeros((52, 72), bool)
    for m in masks.numpy():
        expected |= m & ~binary_erosion(m, border_value=0)
    assert np.array_equal(seg[..., 0] == 255, expected)
    # the paper's defaults on random weights keep nothing: an all-black target, not an error
    assert SegmentationTargetMaker(sam, config=SegmentationConfig(points_per_side=2))(img).max() == 0


@pytest.mark.parametrize("keep", [(768, 1024), (1024, 576), (740, 1024), (1024, 1024), (1, 1024), (513, 1000)])
def test_unpadded_upsampling_is_bit_identical(keep):
    """Our shortcut (not computing SAM's padding rows/columns) equals upsample-then-crop exactly."""
    from unimrg.targets.segmentation import _upsample_unpadded

    x = torch.randn(3, 1, 256, 256, generator=torch.Generator().manual_seed(0)) * 1e-5
    ref = torch.nn.functional.interpolate(x, (1024, 1024), mode="bilinear", align_corners=False)
    assert torch.equal(_upsample_unpadded(x, (1024, 1024), keep), ref[..., :keep[0], :keep[1]])
