"""Shard plumbing shared by the ingestion and the target job: sample keys, image checks, atomic tars.

The on-disk format is the one ``unimrg.data.scenes`` writes and ``unimrg.data.loaders`` reads:
Energon ``CrudeWebdataset`` folders of webdataset tars, ``<key>.jpg`` (or ``.png`` / ``.webp``) plus
``<key>.json`` (und), ``<key>.depth.png`` (depth, 16-bit grey) or ``<key>.seg.png`` (seg, RGB
{0, 255}); members have mtime 0 so equal inputs give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

from unimrg.data.images import MAX_IMAGE_PIXELS, UnreadableImage, decode_rgb, read_rgb  # noqa: F401 (re-exported)

# PIL format → the part name the loaders accept (unimrg.data.loaders.IMAGE_PARTS). Bytes of these
# formats are stored untouched; any other format (GIF, BMP, TIFF, ...) is re-encoded losslessly as PNG.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def sample_key(rel_path: str) -> str:
    """A webdataset key for an image path: readable, no dots or slashes, unique per path.

    Webdataset splits a member name at the first dot of its basename and treats slashes as folders,
    so the path is flattened; a hash of the full path keeps keys distinct after flattening."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", rel_path)[-80:]
    return f"{stem}-{hashlib.sha1(rel_path.encode()).hexdigest()[:10]}"


def read_image(path: str | Path) -> tuple[str, bytes, Image.Image]:
    """(part name, bytes to store, decoded RGB image) of an image file; ``UnreadableImage`` says why not.

    Decoding is unimrg.data.images' (the loaders decode the stored bytes with the same function)."""
    data, rgb = read_rgb(path)
    return _stored(data, rgb)


def decode_image_bytes(data: bytes, source: str) -> tuple[str, bytes, Image.Image]:
    return _stored(data, decode_rgb(data, source))


def _stored(data: bytes, rgb: Image.Image) -> tuple[str, bytes, Image.Image]:
    fmt = Image.open(io.BytesIO(data)).format   # header only: the bytes were decoded once already
    if fmt in STORED_FORMATS:
        return STORED_FORMATS[fmt], data, rgb
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")   # upright 8-bit RGB: decoding it again gives the same pixels
    return "png", buf.getvalue(), rgb


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical shards for identical inputs (a re-run equals an uninterrupted run)
    tar.addfile(info, io.BytesIO(data))


class AtomicTar:
    """A tar written under a temporary name and renamed into place by ``commit()`` (never half-visible)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tar = tarfile.open(self.tmp, "w")
        self.count = 0

    def add(self, key: str, parts: dict[str, bytes]) -> None:
        for part, data in parts.items():
            add_member(self.tar, f"{key}.{part}", data)
        self.count += 1

    def commit(self) -> None:
        self.tar.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file (idempotent; after ``commit()`` it only closes)."""
        if not self.tar.closed:
            self.tar.close()
        self.tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
