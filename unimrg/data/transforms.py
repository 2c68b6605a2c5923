"""Each model's released image transforms: how a picture of any shape becomes the square its encoders read.

    python -m pytest tests/unit/test_image_transforms.py -q

    from unimrg.data.transforms import Fit
    Fit("pad", fill=127).rgb(pil_image, 512)          # Harmon's understanding input (PIL RGB → PIL RGB)
    Fit("short_side_crop").depth(depth_hw, 256)       # a float map through the same geometry

An adapter declares its transforms (``UMMAdapter.image_transforms`` → :class:`ImageTransforms`); the
loaders apply them. This module imports only numpy, PIL and torch, so the loaders (and their worker
processes) never import transformers / diffusers for it, and the declarations pickle.

A :class:`Fit` is one official geometry plus its resampling filter; the same geometry is applied to RGB
pictures, depth maps and boundary maps, so a target stays aligned with the picture it was computed on:

- ``stretch``: resize to S×S (aspect ratio not kept).
- ``pad``: pad to the longer side's square, centred (offset ``(long - short) // 2``, xtuner's
  ``expand2square``), RGB with grey ``fill``, maps with 0; then resize to S×S.
- ``crop``: the centred square of the shorter side's length, then resize to S×S.
- ``short_side_crop``: resize so the shorter side is S (the longer ``int(S · long / short)``), then the
  centred S×S crop (CLIP's image processor, torchvision's ``Resize(S)`` + ``CenterCrop(S)``).
- ``long_side_pad``: resize so the longer side is S (the shorter ``max(round(S · short / long),
  min_side)``), then pad to S×S, centred (``(S - short) // 2``), with ``fill`` (transformers'
  ``JanusImageProcessor``: resize + ``pad_to_square``).

Centre offsets of a difference ``d``: ``offset="floor"`` is ``d // 2`` (transformers' ``center_crop``),
``"round"`` is ``round(d / 2)``, Python's half-to-even rounding (torchvision's ``CenterCrop``).
RGB resizes use PIL with the Fit's filter (as the released pipelines do, antialiased by construction);
depth maps resize bilinearly as float (no overshoot outside [0, 1]); boundary maps with
``unimrg.data.images.resize_boundary`` (no outline lost).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unimrg.data.images import resize_boundary

FITS = ("stretch", "pad", "crop", "short_side_crop", "long_side_pad")
OFFSETS = ("floor", "round")
PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclass(frozen=True)
class Geometry:
    """The steps of one Fit for one W×H input: pad to a square, crop a box, resize, crop a box."""

    pad: tuple[int, int, int] | None            # (side, left, top)
    pre_crop: tuple[int, int, int, int] | None  # (left, top, right, bottom) before the resize
    resize: tuple[int, int]                     # (width, height)
    post_crop: tuple[int, int, int, int] | None  # after the resize
    post_pad: tuple[int, int, int] | None = None  # (side, left, top) after the resize


@dataclass(frozen=True)
class Fit:
    """One released image transform (geometry + RGB filter); see the module docstring."""

    mode: str = "stretch"
    fill: int = 127            # pad: RGB grey of the padding (maps are padded with 0)
    offset: str = "floor"      # crop modes: "floor" (transformers) | "round" (torchvision)
    resample: str = "bicubic"  # PIL filter for RGB pictures
    min_side: int = 1          # long_side_pad: floor of the resized shorter side

    def __post_init__(self) -> None:
        if self.mode not in FITS:
            raise ValueError(f"image fit {self.mode!r}: choose one of {FITS}")
        if self.offset not in OFFSETS:
            raise ValueError(f"image fit offset {self.offset!r}: choose one of {OFFSETS}")
        if self.resample not in PIL_FILTERS:
            raise ValueError(f"image fit resample {self.resample!r}: choose one of {tuple(PIL_FILTERS)}")

    def _centre(self, d: int) -> int:
        return d // 2 if self.offset == "floor" else int(round(d / 2))

    def geometry(self, width: int, height: int, size: int) -> Geometry:
        w, h, s = width, height, size
        if self.mode == "stretch":
            return Geometry(None, None, (s, s), None)
        if self.mode == "pad":
            side = max(w, h)
            return Geometry((side, (side - w) // 2, (side - h) // 2), None, (s, s), None)
        if self.mode == "crop":
            side = min(w, h)
            left, top = self._centre(w - side), self._centre(h - side)
            return Geometry(None, (left, top, left + side, top + side), (s, s), None)
        if self.mode == "long_side_pad":
            rw, rh = (s, max(round(h * s / w), self.min_side)) if w >= h else (max(round(w * s / h), self.min_side), s)
            return Geometry(None, None, (rw, rh), None, (s, (s - rw) // 2, (s - rh) // 2))
        # short_side_crop: transformers' get_resize_output_image_size / torchvision's Resize(int)
        rw, rh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        left, top = self._centre(rw - s), self._centre(rh - s)
        return Geometry(None, None, (rw, rh), (left, top, left + s, top + s))

    # ---- applied to the three kinds of pictures ---------------------------------------------------
    def rgb(self, img: Image.Image, size: int) -> Image.Image:
        """RGB PIL image → RGB PIL image, size × size."""
        g = self.geometry(img.width, img.height, size)
        if g.pad:
            side, left, top = g.pad
            canvas = Image.new("RGB", (side, side), (self.fill,) * 3)
            canvas.paste(img, (left, top))
            img = canvas
        if g.pre_crop:
            img = img.crop(g.pre_crop)
        if img.size != g.resize:
            img = img.resize(g.resize, PIL_FILTERS[self.resample])
        if g.post_crop:
            img = img.crop(g.post_crop)
        if g.post_pad:
            side, left, top = g.post_pad
            canvas = Image.new("RGB", (side, side), (self.fill,) * 3)
            canvas.paste(img, (left, top))
            img = canvas
        return img

    def depth(self, d: np.ndarray, size: int) -> np.ndarray:
        """(H, W) float32 map → (size, size), resized bilinearly as float."""
        return self._map(np.asarray(d, dtype=np.float32), size,
                         lambda a, wh: np.asarray(Image.fromarray(a, mode="F").resize(wh, Image.BILINEAR)))

    def boundary(self, b: np.ndarray, size: int) -> np.ndarray:
        """(H, W) bool boundary map → (size, size) bool, every outline kept."""
        return self._map(np.asarray(b).astype(bool), size, lambda a, wh: resize_boundary(a, (wh[1], wh[0])))

    def _map(self, a: np.ndarray, size: int, resize) -> np.ndarray:
        h, w = a.shape
        g = self.geometry(w, h, size)
        if g.pad:
            a = _pad(a, *g.pad)
        if g.pre_crop:
            l, t, r, b = g.pre_crop
            a = a[t:b, l:r]
        if (a.shape[1], a.shape[0]) != g.resize:
            a = resize(a, g.resize)
        if g.post_crop:
            l, t, r, b = g.post_crop
            a = a[t:b, l:r]
        if g.post_pad:
            a = _pad(a, *g.post_pad)
        return a


def _pad(a: np.ndarray, side: int, left: int, top: int) -> np.ndarray:
    out = np.zeros((side, side), dtype=a.dtype)
    out[top:top + a.shape[0], left:left + a.shape[1]] = a
    return out


STRETCH = Fit("stretch")


@dataclass(frozen=True)
class ImageTransforms:
    """An adapter's released transforms, by use.

    ``understanding``: the und task's image. ``target``: the generation targets (pix / depth / seg), at
    the target side. ``condition``: the generation tasks' input image, at the input side; ``None``
    means "the target picture, resized to the input side by ``condition_resize``" — torch
    ``interpolate(mode=condition_resize, antialias=False)``, what OpenUni does inside its model
    (``get_semantic_features``); the loader does it once and stores uint8 (rounding ≤ 0.5/255, far
    below the bf16 step of the encoder's input)."""

    understanding: Fit = STRETCH
    target: Fit = STRETCH
    condition: Fit | None = STRETCH
    condition_resize: str = "bilinear"
    source: str = ""           # where the release does this (printed by --dry-run)

    def describe(self) -> str:
        cond = (f"target picture → {self.condition_resize} (no antialias)" if self.condition is None
                else _describe(self.condition))
        return (f"understanding {_describe(self.understanding)}; generation condition {cond}; "
                f"targets {_describe(self.target)}" + (f" ({self.source})" if self.source else ""))


def _describe(f: Fit) -> str:
    extra = {"pad": f" grey {f.fill}", "crop": f" offset {f.offset}", "short_side_crop": f" offset {f.offset}",
             "long_side_pad": f" grey {f.fill}"}
    return f"{f.mode}{extra.get(f.mode, '')} {f.resample}"


STRETCH_ALL = ImageTransforms(source="stretched to a square (model.preprocessing=stretch)")


def resize_tensor(x: torch.Tensor, size: int, mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """Float (B, C, H, W) in [0, 1] → (B, C, size, size); a no-op at that size. The adapters' in-model
    resize (inputs that did not come through the loaders, e.g. sampling), with the release's filter."""
    if x.shape[-2:] == (size, size):
        return x
    out = F.interpolate(x, size=(size, size), mode=mode, antialias=antialias,
                        align_corners=False if mode in ("bilinear", "bicubic") else None)
    return out.clamp(0, 1)


def uint8_resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """uint8 (3, H, W) → uint8 (3, size, size) through torch ``interpolate(mode, antialias=False)``."""
    if x.shape[-2:] == (size, size):
        return x
    y = F.interpolate(x[None].float(), size=(size, size), mode=mode, antialias=False,
                      align_corners=False if mode in ("bilinear", "bicubic") else None)[0]
    return y.round().clamp(0, 255).to(torch.uint8)
