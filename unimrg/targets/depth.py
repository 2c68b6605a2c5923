"""Depth targets exactly as the paper's Appendix B.2: Depth Anything V2, min-max normalised to [0, 1].

    from unimrg.targets.depth import DepthTargetMaker
    maker = DepthTargetMaker.from_pretrained("/models/Depth-Anything-V2-Large-hf", device="cuda")
    depth01 = maker(pil_image)             # (H, W) float32 in [0, 1], the image's own size
    png = encode_depth_png(depth01)        # 16-bit grayscale PNG, what the shards store

The resize follows the original repository, not transformers' image processor (they disagree for
images under 518 px: a 500×375 image is 686×518 in the original, 518×392 in ``DPTImageProcessor``):
DepthAnything/Depth-Anything-V2 ``depth_anything_v2/dpt.py`` ``image2tensor`` uses
``util/transform.py`` ``Resize(518, 518, keep_aspect_ratio=True, ensure_multiple_of=14,
resize_method="lower_bound", image_interpolation_method=cv2.INTER_CUBIC)`` on the RGB image / 255
in float64, ImageNet mean/std, and ``infer_image`` resizes the prediction back with
``F.interpolate(depth[:, None], (h, w), mode="bilinear", align_corners=True)``.

cv2 is not a dependency: ``cv2.INTER_CUBIC`` is the a = -0.75 cubic kernel on half-pixel centres
with clamped borders and no antialiasing, which is torch's ``bicubic`` (align_corners=False,
antialias=False). Measured against opencv-python 5.0 on float64 images: max |diff| < 1e-4 (cv2
keeps its interpolation weights in float32), i.e. < 1/40 of an 8-bit grey level.

Storage: [0, 1] → ``round(d * 65535)`` as a 16-bit PNG, so training gets 16-bit precision (an 8-bit
target would quantise depth to 256 levels); the loader replicates it to 3 channels.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DEPTH_PNG_MAX = 65535  # uint16 full scale


@dataclass
class DepthConfig:
    """Depth Anything V2 inference settings (defaults = the original ``infer_image(raw, 518)``)."""

    input_size: int = 518                          # both sides >= this after resizing ("lower_bound")
    multiple_of: int = 14                          # ViT patch size
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet, as in the original transform
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Cap on the network's input tokens ((h'/14)·(w'/14)). The resize has no upper bound: it scales the
    # SHORT side to 518, so a 1×700 strip would become 518×362600 (958K tokens, ~13 GB of host copies, an
    # OOM kill). 16384 tokens admit aspect ratios up to ~12:1 (a 518×518 input is 1369 tokens).
    max_tokens: int = 16384


class ExtremeAspectRatio(ValueError):
    """An image whose Depth Anything input would exceed ``DepthConfig.max_tokens``; the message is the
    report reason ("extreme aspect ratio: ...")."""


def check_depth_input(height: int, width: int, config: DepthConfig = DepthConfig()) -> tuple[int, int]:
    """The network input size of an image of this size; ``ExtremeAspectRatio`` past the token cap."""
    nh, nw = da2_input_size(height, width, config.input_size, config.multiple_of)
    tokens = (nh // config.multiple_of) * (nw // config.multiple_of)
    if tokens > config.max_tokens:
        raise ExtremeAspectRatio(
            f"extreme aspect ratio: {width}x{height} would be resized to {nw}x{nh} for Depth Anything, "
            f"{tokens} tokens > the cap of {config.max_tokens} (--depth-max-tokens); skipped")
    return nh, nw


def _constrain_to_multiple_of(x: float, multiple: int, min_val: int) -> int:
    # Original Resize.constrain_to_multiple_of: round to the nearest multiple, go up if below min_val.
    # Python's round() is banker's rounding like numpy's np.round used there.
    y = int(round(x / multiple) * multiple)
    if y < min_val:
        y = int(math.ceil(x / multiple) * multiple)
    return y


def da2_input_size(height: int, width: int, input_size: int = 518, multiple_of: int = 14) -> tuple[int, int]:
    """(height, width) the original Depth Anything V2 feeds the network for an image of this size.

    "lower_bound" with keep_aspect_ratio: scale so that BOTH sides are >= input_size (the larger of the
    two scale factors), then round each side to a multiple of 14, never below input_size.
    """
    scale = max(input_size / height, input_size / width)
    return (_constrain_to_multiple_of(scale * height, multiple_of, input_size),
            _constrain_to_multiple_of(scale * width, multiple_of, input_size))


def da2_pixel_values(image: Image.Image, config: DepthConfig = DepthConfig()) -> torch.Tensor:
    """The network input (1, 3, h', w') float32 for an RGB PIL image, as the original computes it."""
    rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0)  # (H, W, 3) float64
    h, w = rgb.shape[:2]
    nh, nw = da2_input_size(h, w, config.input_size, config.multiple_of)
    x = F.interpolate(rgb.permute(2, 0, 1)[None], size=(nh, nw), mode="bicubic", align_corners=False)
    mean = torch.tensor(config.mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(config.std, dtype=torch.float64)[:, None, None]
    return ((x - mean) / std).float()                                               # (1, 3, nh, nw)


def normalize_depth(depth: torch.Tensor, rel_tol: float = 1e-6) -> torch.Tensor:
    """Min-max to [0, 1] (same shape, float32); a flat map becomes all zeros, never NaN.

    "Flat" means a range within ``rel_tol`` of the values' magnitude: resizing a constant prediction
    bilinearly leaves float32 rounding noise of a few ulps, which min-max would blow up to [0, 1]."""
    depth = depth.float()
    lo, hi = depth.min(), depth.max()
    # `not >` also catches NaN extremes, which would otherwise poison the whole map
    if not bool((hi - lo) > rel_tol * torch.maximum(hi.abs(), lo.abs())):
        return torch.zeros_like(depth)
    return (depth - lo) / (hi - lo)


def prediction_to_target(pred: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Network prediction (h', w') → (height, width) float32 in [0, 1]: bilinear (align_corners=True,
    as the original ``infer_image``), then min-max."""
    up = F.interpolate(pred.float()[None, None], size=(height, width), mode="bilinear", align_corners=True)
    return normalize_depth(up[0, 0])


def encode_depth_png(depth01: np.ndarray | torch.Tensor) -> bytes:
    """(H, W) float in [0, 1] → 16-bit grayscale PNG bytes (``round(d * 65535)``)."""
    d = torch.as_tensor(depth01).float().cpu().numpy()
    if d.ndim != 2:
        raise ValueError(f"encode_depth_png expects an (H, W) map, got shape {d.shape}")
    q = np.round(np.clip(d, 0.0, 1.0) * DEPTH_PNG_MAX).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(q).save(buf, format="PNG")  # uint16 array → mode "I;16", stored as 16-bit PNG
    return buf.getvalue()


def decode_depth_png(data: bytes) -> np.ndarray:
    """16-bit PNG bytes → (H, W) float32 in [0, 1]. An 8-bit PNG is accepted and scaled by 255."""
    img = Image.open(io.BytesIO(data))
    a = np.asarray(img)
    if a.ndim == 3:  # tolerate an RGB-stored map: the three channels are equal by construction
        a = a[..., 0]
    scale = 255.0 if a.dtype == np.uint8 else float(DEPTH_PNG_MAX)
    return a.astype(np.float32) / scale


def depth_to_rgb(depth01: np.ndarray) -> np.ndarray:
    """(H, W) [0, 1] → (H, W, 3) float32: the paper's 3-channel target (channels replicated)."""
    return np.repeat(np.asarray(depth01, dtype=np.float32)[..., None], 3, axis=-1)


class DepthTargetMaker:
    """Depth Anything V2 (a transformers ``DepthAnythingForDepthEstimation``) → [0, 1] depth maps."""

    def __init__(self, model: torch.nn.Module, config: DepthConfig = DepthConfig(), device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.config = config
        self.device = torch.device(device)
        self.dtype = next(self.model.parameters()).dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        config: DepthConfig = DepthConfig()) -> "DepthTargetMaker":
        """Load a local HF-format folder (e.g. depth-anything/Depth-Anything-V2-Large-hf)."""
        from transformers import DepthAnythingForDepthEstimation

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--depth-model {path}: no config.json there. Pass a local folder holding the HF-format "
                "Depth Anything V2 weights (config.json + model.safetensors), e.g. a download of "
                "depth-anything/Depth-Anything-V2-Large-hf.")
        model = DepthAnythingForDepthEstimation.from_pretrained(str(path), local_files_only=True)
        return cls(model, config, device)

    @torch.inference_mode()
    def predict(self, image: Image.Image) -> torch.Tensor:
        """Raw relative-depth prediction (h', w') at the network's input size."""
        check_depth_input(image.height, image.width, self.config)   # before any huge allocation
        x = da2_pixel_values(image, self.config).to(self.device, self.dtype)
        return self.model(pixel_values=x).predicted_depth[0]

    def __call__(self, image: Image.Image) -> np.ndarray:
        """(H, W) float32 depth in [0, 1] at the image's own size."""
        pred = self.predict(image)
        return prediction_to_target(pred, image.height, image.width).cpu().numpy()
