"""The one image decoder of the data path: ingestion, the target job and the training loaders all call it.

    from unimrg.data.images import decode_rgb, resize_boundary
    rgb = decode_rgb(open("x.png", "rb").read(), source="x.png")   # 8-bit RGB PIL image, upright
    small = resize_boundary(boundary_bool_hw, (56, 56))            # every outline kept

Why one decoder: the targets (depth / boundaries) are computed from the pixels the job decodes, and
the trainer pairs them with the pixels the loader decodes from the same stored bytes. Any difference
(orientation, bit depth, alpha) silently misaligns image and target, so both go through here.

What it does with each kind of input (``decode_rgb``):
- 16-bit images (grey ``I;16*``, 16-bit RGB/RGBA/grey+alpha PNG): scaled to 8 bits by the high byte
  (``v >> 8``), the rule Pillow applies to 16-bit colour PNGs; ``convert("RGB")`` on ``I;16`` would
  clip every value above 255 to white. 32-bit integer images (``I``) are read the same way when their
  values fit 16 bits; otherwise, and for floating-point images (``F``), the image is reported
  ``unsupported`` (no scale is implied by the file).
- CMYK (e.g. print JPEGs; Adobe-inverted ones are un-inverted by Pillow): Pillow's conversion,
  ``R = (255 - C)(255 - K) / 255``; embedded ICC profiles are not applied (neither for RGB images).
- Transparency (RGBA, LA, palette with a transparent colour): composited over white, what a viewer
  shows; LLaVA's ``convert("RGB")`` would expose whatever colour the transparent pixels hold.
- EXIF orientation: applied (the image is made upright, as every viewer shows it and as the
  conversations about it were written). The stored shard keeps the original bytes; the loader decodes
  them here again, so image, depth and boundary targets (computed on the upright image, stored
  without orientation) always agree. An unreadable EXIF block counts as "no orientation".
- Failures raise :class:`UnreadableImage`; its message starts with the reason kind, then the file:
  ``missing``, ``unreadable`` (I/O error), ``too large`` (more than ``max_pixels`` pixels, including
  Pillow's decompression-bomb check), ``truncated``, ``corrupt`` (not an image / bad data) or
  ``unsupported`` (a pixel format with no defined 8-bit RGB meaning).

``resize_boundary`` brings a boundary map (white outlines on black) to the training resolution
without losing outlines: along an axis that shrinks, every output pixel is the max over the source
pixels whose centres fall in it (a partition, so a 1-pixel line stays 1 pixel wide); along an axis
that grows, nearest neighbour (every source pixel is sampled at least once). NEAREST downsampling
keeps only the lines that happen to cross a sampled pixel: ~19 % of the outline pixels at 56 px.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

MAX_IMAGE_PIXELS = 100_000_000  # larger images are reported "too large" (SAM's masks are H×W each)
BACKGROUND = (255, 255, 255)     # transparent pixels are composited over this

# EXIF orientation tag (0x0112) value → the transpose that makes the image upright (as ImageOps.exif_transpose)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


class UnreadableImage(ValueError):
    """An image that is missing, unreadable, too large, truncated, corrupt or of an unsupported pixel
    format; the message ("<kind>: <file>: <details>") is the report's reason."""


def _classify(e: BaseException) -> str:
    msg = str(e).lower()
    if isinstance(e, Image.DecompressionBombError) or "too large" in msg:
        return "too large"       # Pillow's bomb check; a PNG text chunk that decompresses too far
    if isinstance(e, EOFError) or "truncated" in msg or "end of file" in msg or "incomplete" in msg:
        return "truncated"
    return "corrupt"


def open_image(data: bytes, source: str = "<bytes>", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The fully decoded PIL image of ``data`` in its own mode (no conversion); ``UnreadableImage`` says why not."""
    # Whatever a broken file makes Pillow raise (OSError, SyntaxError, ValueError, EOFError, zlib.error,
    # struct.error, DecompressionBombError, ...) is this image's problem, never the caller's crash.
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:   # no readable header: "corrupt" (or Pillow's bomb check: "too large")
        kind = "too large" if _classify(e) == "too large" else "corrupt"
        raise UnreadableImage(f"{kind}: {source}: {type(e).__name__}: {e}") from None
    if img.width * img.height > max_pixels:
        raise UnreadableImage(f"too large: {source} is {img.width}x{img.height} (> {max_pixels} pixels); "
                              f"downscale it first")
    try:
        img.load()  # full decode now: a truncated file fails here, not inside a model or a resize
    except Exception as e:   # the header was fine: mostly pixel data that ends early
        raise UnreadableImage(f"{_classify(e)}: {source}: {type(e).__name__}: {e}") from None
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:   # a broken EXIF block is metadata damage, not a broken image
        return 1


def _high_byte(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) >> 8).astype(np.uint8)


def _over_background(rgba: Image.Image) -> Image.Image:
    base = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_rgb(img: Image.Image, source: str = "<image>") -> Image.Image:
    """An opened image (any mode) → 8-bit RGB, upright (EXIF orientation applied); see the module docstring."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise UnreadableImage(f"unsupported: {source}: 32-bit integer image with values "
                                  f"{int(a.min())}..{int(a.max())} (no 8-bit scale is implied); convert it to "
                                  f"8-bit RGB first")
        rgb = Image.fromarray(np.repeat(_high_byte(a)[..., None], 3, axis=-1), "RGB")
    elif mode == "F":
        raise UnreadableImage(f"unsupported: {source}: floating-point image (mode F; no 8-bit scale is "
                              f"implied); convert it to 8-bit RGB first")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:   # incl. a tRNS colour key
        rgb = _over_background(img.convert("RGBA"))
    elif mode == "RGB":
        rgb = img
    else:   # L, 1, P, CMYK, YCbCr, HSV, LAB, ...
        try:
            rgb = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise UnreadableImage(f"unsupported: {source}: mode {mode} has no RGB conversion ({e})") from None
    orientation = _orientation(img)
    if orientation in _ORIENTATION:
        rgb = rgb.transpose(_ORIENTATION[orientation])
    return rgb


def decode_rgb(data: bytes, source: str = "<bytes>", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Image bytes → 8-bit RGB PIL image, upright; ``UnreadableImage`` (with the reason) otherwise."""
    img = open_image(data, source, max_pixels)
    try:
        return to_rgb(img, source)
    except UnreadableImage:
        raise
    except Exception as e:   # a conversion Pillow cannot do on this file's data
        raise UnreadableImage(f"corrupt: {source}: {type(e).__name__}: {e}") from None


def read_rgb(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[bytes, Image.Image]:
    """(file bytes, decoded RGB image) of an image file; ``UnreadableImage`` says why not."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UnreadableImage(f"missing: {path} does not exist") from None
    except OSError as e:
        raise UnreadableImage(f"unreadable: {path}: {type(e).__name__}: {e}") from None
    return data, decode_rgb(data, str(path), max_pixels)


def _axis_groups(n_in: int, n_out: int) -> np.ndarray:
    """Start index of each output cell's source run along a shrinking axis: source pixel p belongs to
    output cell floor((p + 0.5) * n_out / n_in) (its centre's cell); every cell gets >= 1 pixel."""
    cell = ((np.arange(n_in) + 0.5) * n_out / n_in).astype(np.int64)
    return np.flatnonzero(np.diff(cell, prepend=-1))


def resize_boundary(boundary: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool boundary map → (h, w) bool with every outline kept (see the module docstring)."""
    b = np.asarray(boundary).astype(bool)
    for axis, n_out in enumerate(size):
        n_in = b.shape[axis]
        if n_out == n_in:
            continue
        if n_out < n_in:
            b = np.logical_or.reduceat(b, _axis_groups(n_in, n_out), axis=axis)
        else:   # PIL NEAREST's sampling: output o reads source floor((o + 0.5) * n_in / n_out)
            idx = np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
            b = np.take(b, idx, axis=axis)
    return b
