"""Segmentation targets exactly as the paper's Appendix B.3: boundaries of SAM's automatic masks.

    from unimrg.targets.segmentation import SegmentationTargetMaker
    maker = SegmentationTargetMaker.from_pretrained("/models/sam-vit-huge", device="cuda")
    seg = maker(pil_image)                 # (H, W, 3) uint8, mask boundaries 255 on 0

SAM automatic mask generator with its default parameters (facebookresearch/segment-anything
``segment_anything/automatic_mask_generator.py``: points_per_side=32, points_per_batch=64,
pred_iou_thresh=0.88, stability_score_thresh=0.95, stability_score_offset=1.0, box_nms_thresh=0.7,
crop_n_layers=0, min_mask_region_area=0), on transformers' ``SamModel`` loaded from a local folder.
The boundary of a mask is its inner 1-pixel outline with 4-connectivity, the frame counting as
outside (``m & ~scipy.ndimage.binary_erosion(m, border_value=0)``); all kept masks' outlines are
OR-ed, white on black, 3 equal channels.

``SegmentationTargetMaker.masks`` returns exactly the masks of transformers'
``pipeline("mask-generation")`` (with :func:`unimrg.targets.nms.box_nms` as its final NMS, since
the pipeline's own needs torchvision), but does less work per image:
- the image embedding is computed once and the prompt grid is built once (no per-batch re-packing);
- the ``pred_iou_thresh`` test runs on the decoder's scores *before* any upsampling, so the
  256×256 logits of rejected masks (most of the 3 × 1024 candidates with a trained SAM) are never
  upsampled to 1024² and then to the image size, nor stability-scored;
- no RLE round trip: the pipeline run-length encodes every surviving mask in Python and decodes
  the kept ones again; here the binary masks stay tensors on the device;
- upsampling is chunked over masks, so memory stays bounded for any ``points_per_batch``.
Every kept computation is the same torch op on the same values as in the pipeline (bilinear
1024² → crop → image size, ``> mask_threshold``, the stability ratio), hence identical masks.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unimrg.targets.nms import box_nms


@dataclass
class SegmentationConfig:
    """Automatic-mask-generator settings; defaults = SamAutomaticMaskGenerator's (paper: "default")."""

    points_per_side: int = 32            # 32×32 prompt grid
    # prompts per decoder call. The pipeline's default; another value changes the decoder's float
    # rounding (matmul blocking depends on the batch), so masks may then differ from the pipeline's
    # in pixels whose logit is within rounding of the threshold
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    mask_threshold: float = 0.0          # logit threshold that binarises a mask
    upsample_chunk: int = 32             # masks upsampled at once: chunk × 1024² × 4 B of scratch


def sam_image_processor():
    """``SamImageProcessorPil`` with facebook/sam-vit-huge's preprocessor_config.json values.

    The Pil variant needs no torchvision; the values are those of every official SAM checkpoint."""
    from transformers import SamImageProcessorPil

    return SamImageProcessorPil(
        do_resize=True, size={"longest_edge": 1024}, resample=2,  # PIL BILINEAR
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        do_pad=True, pad_size={"height": 1024, "width": 1024},
        mask_size={"longest_edge": 256}, mask_pad_size={"height": 256, "width": 256}, do_convert_rgb=True)


def load_sam(path: str | Path):
    """(SamModel, SamImageProcessorPil) from a local HF-format folder (e.g. facebook/sam-vit-huge)."""
    from transformers import SamImageProcessorPil, SamModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--sam-model {path}: no config.json there. Pass a local folder holding the HF-format SAM "
            "weights (config.json + model.safetensors), e.g. a download of facebook/sam-vit-huge.")
    model = SamModel.from_pretrained(str(path), local_files_only=True)
    if (path / "preprocessor_config.json").is_file():
        processor = SamImageProcessorPil.from_pretrained(str(path), local_files_only=True)
    else:
        processor = sam_image_processor()
    return model, processor


def point_grid(height: int, width: int, points_per_side: int, longest_edge: int = 1024) -> torch.Tensor:
    """The AMG prompt grid in the resized frame SAM sees: (n², 2) float64 (x, y), x fastest.

    Cell centres of an n×n grid over the image (segment_anything ``build_point_grid``), scaled to
    pixels, then to the frame whose longest side is ``longest_edge`` (``ResizeLongestSide``).
    Computed with the same float64 operations as transformers' ``generate_crop_boxes``, so the
    decoder sees bit-identical prompts."""
    offset = 1.0 / (2 * points_per_side)
    side = np.linspace(offset, 1 - offset, points_per_side)
    xy = np.stack([np.tile(side[None, :], (points_per_side, 1)),
                   np.tile(side[:, None], (1, points_per_side))], axis=-1).reshape(-1, 2)
    xy = xy * np.array([[width, height]])
    scale = longest_edge * 1.0 / max(height, width)
    new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
    xy = xy.astype(float)
    xy[:, 0] = xy[:, 0] * (new_w / width)
    xy[:, 1] = xy[:, 1] * (new_h / height)
    return torch.from_numpy(xy)


def _upsample_unpadded(x: torch.Tensor, padded: tuple[int, int], keep: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, padded, bilinear)[..., :keep[0], :keep[1]]`` without computing the dropped part.

    SAM's low-res logits (256²) are upsampled to the padded 1024² frame and the padding (e.g. 256 of
    1024 rows for a 4:3 image) is then cut away. Bilinear with align_corners=False maps output index
    o to source ``(o + 0.5) * in/out - 0.5``; giving the kernel only the first r input rows and asking
    for ``r * out/in`` output rows keeps ``in/out`` exactly (an integer ratio, 1024/256), so each kept
    output uses the same source positions and weights as before, as long as its right-hand neighbour
    (``floor(src) + 1``) is still inside the r rows: r = ceil(keep / ratio) + 1 suffices."""
    in_h, in_w = x.shape[-2:]
    sizes = []
    for n_in, n_out, n_keep in ((in_h, padded[0], keep[0]), (in_w, padded[1], keep[1])):
        if n_out % n_in:                       # not an integer ratio: no exact shortcut
            sizes.append((n_in, n_out))
            continue
        ratio = n_out // n_in
        r = min(n_in, -(-n_keep // ratio) + 1)
        sizes.append((r, r * ratio))
    (rh, oh), (rw, ow) = sizes
    up = F.interpolate(x[..., :rh, :rw], (oh, ow), mode="bilinear", align_corners=False)
    return up[..., :keep[0], :keep[1]]


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) bool → (K, 4) int64 xyxy of the inclusive pixel extent; an empty mask → [0, 0, 0, 0]."""
    k, h, w = masks.shape
    if k == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=masks.device)
    rows, cols = masks.any(-1), masks.any(-2)                     # (K, H), (K, W)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    top = torch.where(rows, ar_h, h).amin(-1)
    bottom = torch.where(rows, ar_h, -1).amax(-1)
    left = torch.where(cols, ar_w, w).amin(-1)
    right = torch.where(cols, ar_w, -1).amax(-1)
    boxes = torch.stack([left, top, right, bottom], -1)
    return boxes * rows.any(-1, keepdim=True)                     # empty masks → zeros


def mask_boundaries(masks: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """OR over masks of each mask's inner 1-pixel outline: (K, H, W) bool → (H, W) bool.

    A pixel is on the outline when it is in the mask and one of its 4 neighbours is not; pixels on
    the image frame count as having an outside neighbour (= binary_erosion with border_value=0)."""
    if masks.ndim != 3:
        raise ValueError(f"mask_boundaries expects (K, H, W) masks, got shape {tuple(masks.shape)}")
    out = torch.zeros(masks.shape[-2:], dtype=torch.bool, device=masks.device)
    for i in range(0, masks.shape[0], chunk):
        m = masks[i:i + chunk].bool()
        inner = m.clone()
        inner[:, 1:, :] &= m[:, :-1, :]
        inner[:, :-1, :] &= m[:, 1:, :]
        inner[:, :, 1:] &= m[:, :, :-1]
        inner[:, :, :-1] &= m[:, :, 1:]
        inner[:, 0, :] = False
        inner[:, -1, :] = False
        inner[:, :, 0] = False
        inner[:, :, -1] = False
        out |= (m & ~inner).any(0)
    return out


def boundary_rgb(boundary: torch.Tensor | np.ndarray) -> np.ndarray:
    """(H, W) bool → (H, W, 3) uint8 with 255 on the outlines, 0 elsewhere."""
    b = torch.as_tensor(boundary).cpu().numpy().astype(np.uint8) * 255
    return np.repeat(b[..., None], 3, axis=-1)


def encode_seg_png(boundary: torch.Tensor | np.ndarray) -> bytes:
    """(H, W) bool / {0,255} or (H, W, 3) → RGB PNG of {0, 255}, 3 equal channels (the format
    unimrg.data.scenes writes for ``<key>.seg.png``; PNG compresses the repeated channels away)."""
    a = torch.as_tensor(boundary).cpu().numpy()
    if a.ndim == 3:
        a = a[..., 0]
    buf = io.BytesIO()
    Image.fromarray(boundary_rgb(a > 0)).save(buf, format="PNG")
    return buf.getvalue()


def decode_seg_png(data: bytes) -> np.ndarray:
    """PNG bytes → (H, W) uint8 in {0, 255}."""
    a = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    return np.where(a > 127, 255, 0).astype(np.uint8)


class SegmentationTargetMaker:
    """SAM automatic masks → boundary maps; ``masks()`` equals the transformers pipeline's masks."""

    def __init__(self, model: torch.nn.Module, processor=None, config: SegmentationConfig = SegmentationConfig(),
                 device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.processor = processor if processor is not None else sam_image_processor()
        self.config = config
        self.device = torch.device(device)
        self.dtype = next(self.model.parameters()).dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        config: SegmentationConfig = SegmentationConfig()) -> "SegmentationTargetMaker":
        model, processor = load_sam(path)
        return cls(model, processor, config, device)

    @torch.inference_mode()
    def masks(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Automatic masks of one RGB image, in the pipeline's order (NMS keep order).

        Returns masks (K, H, W) bool, scores (K,) float, boxes (K, 4) int64 xyxy, on ``self.device``."""
        cfg = self.config
        image = image.convert("RGB")
        width, height = image.size
        inputs = self.processor(images=[image], return_tensors="pt")
        pad_h, pad_w = self.processor.pad_size["height"], self.processor.pad_size["width"]
        new_h, new_w = (int(v) for v in inputs["reshaped_input_sizes"][0])
        longest = self.processor.size["longest_edge"]
        embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device, self.dtype))

        points = point_grid(height, width, cfg.points_per_side, longest).to(self.device)  # (P, 2) float64
        points = points[None, :, None, :]                                                 # (1, P, 1, 2)
        labels = torch.ones(points.shape[:3], dtype=torch.long, device=self.device)       # (1, P, 1)

        kept_masks, kept_scores = [], []
        for start in range(0, points.shape[1], cfg.points_per_batch):
            out = self.model(image_embeddings=embeddings,
                             input_points=points[:, start:start + cfg.points_per_batch],
                             input_labels=labels[:, start:start + cfg.points_per_batch],
                             multimask_output=True)
            logits = out.pred_masks[0].flatten(0, 1)      # (B·3, 256, 256), point-major like the pipeline
            scores = out.iou_scores[0].flatten(0, 1)      # (B·3,)
            if cfg.pred_iou_thresh > 0.0:                 # cheap test first: nothing rejected gets upsampled
                sel = scores > cfg.pred_iou_thresh
                logits, scores = logits[sel], scores[sel]
            for c in range(0, logits.shape[0], cfg.upsample_chunk):
                # The pipeline's post_process_masks: bilinear to the padded 1024² frame, drop padding,
                # bilinear to the image size (same ops on the same values → bit-identical logits),
                # except that the padding rows/columns are not computed in the first place.
                up = _upsample_unpadded(logits[c:c + cfg.upsample_chunk, None], (pad_h, pad_w), (new_h, new_w))
                up = F.interpolate(up, (height, width), mode="bilinear", align_corners=False)[:, 0]  # (k, H, W)
                s = scores[c:c + cfg.upsample_chunk]
                if cfg.stability_score_thresh > 0.0:
                    inter = (up > cfg.mask_threshold + cfg.stability_score_offset).sum((-1, -2), dtype=torch.int32)
                    union = (up > cfg.mask_threshold - cfg.stability_score_offset).sum((-1, -2), dtype=torch.int32)
                    stable = (inter / union) > cfg.stability_score_thresh             # 0/0 = NaN → rejected
                    up, s = up[stable], s[stable]
                kept_masks.append(up > cfg.mask_threshold)
                kept_scores.append(s)
        # crop_n_layers=0: the only crop is the whole image, so the pipeline's crop-edge filter, mask
        # padding and box offset are identities and are skipped.
        masks = torch.cat(kept_masks) if kept_masks else torch.zeros(0, height, width, dtype=torch.bool,
                                                                     device=self.device)
        scores = torch.cat(kept_scores) if kept_scores else torch.zeros(0, device=self.device)
        boxes = masks_to_boxes(masks)
        keep = box_nms(boxes, scores, cfg.box_nms_thresh)
        return masks[keep], scores[keep], boxes[keep]

    @torch.inference_mode()
    def boundary(self, image: Image.Image) -> torch.Tensor:
        """(H, W) bool outline map of all automatic masks."""
        masks, _, _ = self.masks(image)
        if masks.shape[0] == 0:
            return torch.zeros(image.height, image.width, dtype=torch.bool)
        return mask_boundaries(masks, self.config.upsample_chunk).cpu()

    def __call__(self, image: Image.Image) -> np.ndarray:
        """(H, W, 3) uint8 target: mask boundaries 255 on a 0 background."""
        return boundary_rgb(self.boundary(image))


# ---------------------------------------------------------------- the baseline we must equal
def torch_nms_sam_processor(processor=None):
    """A ``SamImageProcessorPil`` whose final NMS is :func:`box_nms` instead of torchvision's.

    transformers' ``post_process_for_mask_generation`` imports torchvision even when no mask
    survives; everything else in ``pipeline("mask-generation")`` stays transformers' own code."""
    from transformers import SamImageProcessorPil
    from transformers.models.sam.image_processing_pil_sam import _rle_to_mask

    class SamImageProcessorTorchNMS(SamImageProcessorPil):
        def post_process_for_mask_generation(self, all_masks, all_scores, all_boxes, crops_nms_thresh):
            keep = box_nms(all_boxes, all_scores, crops_nms_thresh)
            rle = [all_masks[i] for i in keep.tolist()]
            return [_rle_to_mask(r) for r in rle], all_scores[keep], rle, all_boxes[keep]

    base = processor if processor is not None else sam_image_processor()
    return SamImageProcessorTorchNMS(**base.to_dict())


def reference_pipeline(model: torch.nn.Module, processor=None, device: str | torch.device = "cpu"):
    """transformers' ``pipeline("mask-generation")`` on ``model`` with the torch NMS override."""
    from transformers import pipeline

    return pipeline("mask-generation", model=model, image_processor=torch_nms_sam_processor(processor),
                    device=torch.device(device))


def pipeline_kwargs(config: SegmentationConfig) -> dict:
    """Our config in the pipeline's parameter names (points_per_side → points_per_crop, ...)."""
    return dict(points_per_crop=config.points_per_side, points_per_batch=config.points_per_batch,
                pred_iou_thresh=config.pred_iou_thresh, stability_score_thresh=config.stability_score_thresh,
                stability_score_offset=config.stability_score_offset, crops_nms_thresh=config.box_nms_thresh,
                mask_threshold=config.mask_threshold, crops_n_layers=0)
