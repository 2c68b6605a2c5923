"""Bad inputs on the 665K-image path: one decoder everywhere, outlines that survive resizing, no poison images.

    OMP_NUM_THREADS=1 python -m pytest tests/integration/test_bad_inputs.py -q

The corpus (16-bit grey and RGB PNG, CMYK JPEG, EXIF-rotated JPEG, RGBA / palette transparency, a 1×700
strip, decompression bombs, truncated files) is decoded directly, then run through the real target job
with the tiny random Depth Anything / SAM models: each image ends as documented in unimrg.data.images
and unimrg.targets.job -- correct pixels (and targets computed from them), or a report line with its
reason. Then a real job process is SIGKILLed twice on one image: the re-run marks it poison, finishes,
and the report names it; ``--exclude`` drops images without touching finished shards.
"""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy.ndimage import binary_dilation

from unimrg.data import images
from unimrg.data.images import UnreadableImage, decode_rgb, resize_boundary
from unimrg.data.loaders import decode_boundary
from unimrg.data.loaders import decode_rgb as loader_decode_rgb
from unimrg.targets.depth import (DepthConfig, DepthTargetMaker, ExtremeAspectRatio, check_depth_input,
                                  decode_depth_png)
from unimrg.targets import job
from unimrg.targets.job import crashed_attempts, finalize, main as job_main
from unimrg.targets.segmentation import encode_seg_png, mask_boundaries
from unimrg.targets.tiny import save_tiny_models

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------- the corpus

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): (H, W) grey or (H, W, 3) RGB."""
    h, w = a.shape[:2]
    color_type = 0 if a.ndim == 2 else 2
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height 8-bit grey pixels: a decompression bomb's header."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


GREY16 = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85).astype(np.uint16)      # 0 .. 65195
RGB16 = np.stack([GREY16, GREY16[::-1], np.full_like(GREY16, 40000)], axis=-1)


def exif_rotated() -> tuple[bytes, np.ndarray]:
    """A 40×20 JPEG (left red, right blue) tagged orientation 6 (shown rotated 90° clockwise), and the
    upright pixels a viewer shows: 20 wide, 40 tall, red on top."""
    img = Image.new("RGB", (40, 20), (230, 20, 20))
    ImageDraw.Draw(img).rectangle([20, 0, 39, 19], fill=(20, 20, 230))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = np.zeros((40, 20, 3), np.uint8)
    upright[:20], upright[20:] = (230, 20, 20), (20, 20, 230)
    return encode(img, "JPEG", quality=100, exif=exif.tobytes()), upright


def cmyk_jpeg() -> bytes:
    """Four 16-px columns: cyan, magenta, yellow, 50 % black."""
    img = Image.new("CMYK", (64, 16))
    for i, ink in enumerate([(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 128)]):
        ImageDraw.Draw(img).rectangle([16 * i, 0, 16 * i + 15, 15], fill=ink)
    return encode(img, "JPEG", quality=100)


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return data[:len(data) // 2]


# ------------------------------------------------------------------------------------- decoding

def test_16_bit_grey_and_rgb_are_scaled_not_clipped():
    data = png16(GREY16)
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) == 255).mean() > 0.99   # the bug: all white
    got = np.asarray(decode_rgb(data))
    assert got.shape == (24, 32, 3) and (got == (GREY16 >> 8)[..., None]).all()
    got = np.asarray(decode_rgb(png16(RGB16)))
    assert (got == (RGB16 >> 8)).all()                          # the high byte, as Pillow's 16-bit RGB path
    # the loader (which reads the stored original bytes) decodes through the same function
    small = loader_decode_rgb(data, 8).permute(1, 2, 0).numpy()
    assert np.array_equal(small, np.asarray(Image.fromarray((GREY16 >> 8).astype(np.uint8)).convert("RGB")
                                            .resize((8, 8), Image.BICUBIC)))


def test_cmyk_palette_and_alpha():
    got = np.asarray(decode_rgb(cmyk_jpeg())).astype(int)
    for i, want in enumerate([(0, 255, 255), (255, 0, 255), (255, 255, 0), (127, 127, 127)]):
        assert np.abs(got[4:12, 16 * i + 4:16 * i + 12] - want).max() <= 6, (i, got[8, 16 * i + 8])
    rgba = np.zeros((4, 4, 4), np.uint8)                        # transparent black with one opaque red pixel
    rgba[0, 0] = (255, 0, 0, 255)
    got = np.asarray(decode_rgb(encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert (got[0, 0] == (255, 0, 0)).all() and (got[1:] == 255).all()        # over white, not black
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    got = np.asarray(decode_rgb(encode(pal, "PNG", transparency=0)))
    assert (got[1, 1] == (0, 200, 0)).all() and (got[0, 0] == 255).all()
    keyed = Image.new("RGB", (2, 2), (0, 0, 0))                # RGB PNG with a transparent colour key
    keyed.putpixel((0, 0), (7, 8, 9))
    got = np.asarray(decode_rgb(encode(keyed, "PNG", transparency=(0, 0, 0))))
    assert (got[0, 0] == (7, 8, 9)).all() and (got[1, 1] == 255).all()
    grey_alpha = Image.fromarray(np.stack([np.full((2, 2), 50, np.uint8), np.full((2, 2), 255, np.uint8)], -1), "LA")
    assert (np.asarray(decode_rgb(encode(grey_alpha, "PNG"))) == 50).all()


def test_exif_orientation_is_applied():
    data, upright = exif_rotated()
    got = np.asarray(decode_rgb(data)).astype(int)
    assert got.shape == (40, 20, 3)
    assert np.abs(got[2:18] - upright[2:18]).max() <= 8 and np.abs(got[22:38] - upright[22:38]).max() <= 8


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_failures_are_reported_with_their_reason(tmp_path):
    cases = {
        "bomb": (png_header_only(20_000, 20_000), "too large:"),       # past Pillow's bomb limit
        "big": (png_header_only(12_000, 10_000), "too large:"),        # past our 100M-pixel cap
        "cut.jpg": (truncated_jpeg(), "truncated:"),
        "cut.png": (encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:60], "truncated:"),
        "junk": (b"\xff\xd8\xff\xe0 no JPEG after its header", "corrupt:"),
        "float": (encode(Image.fromarray(np.ones((4, 4), np.float32)), "TIFF"), "unsupported:"),
    }
    for name, (data, reason) in cases.items():
        with pytest.raises(UnreadableImage) as e:
            decode_rgb(data, source=name)
        assert str(e.value).startswith(f"{reason} {name}"), str(e.value)
    with pytest.raises(UnreadableImage, match="^missing:"):
        images.read_rgb(tmp_path / "none.jpg")


def test_depth_token_cap():
    assert check_depth_input(480, 640) == (518, 686)             # ordinary images are untouched
    with pytest.raises(ExtremeAspectRatio, match=r"^extreme aspect ratio: 1x700 .* 958300 tokens > the cap of 16384"):
        check_depth_input(700, 1)
    check_depth_input(700, 1, DepthConfig(max_tokens=10**6))     # configurable


# ------------------------------------------------------------------------------------- boundaries

def random_boundary(h: int = 480, w: int = 640, n: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(n):
        img = Image.new("1", (w, h))
        x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        box = [x, y, x + int(rng.integers(20, 300)), y + int(rng.integers(20, 250))]
        (ImageDraw.Draw(img).ellipse if rng.random() < .5 else ImageDraw.Draw(img).rectangle)(box, fill=1)
        masks.append(np.asarray(img, bool))
    return mask_boundaries(torch.as_tensor(np.stack(masks))).numpy()


def coverage(src: np.ndarray, out: np.ndarray) -> float:
    """Fraction of the source outline pixels whose location at the output resolution has a white pixel
    within 1 px."""
    (H, W), (h, w) = src.shape, out.shape
    ys, xs = np.nonzero(src)
    near = binary_dilation(out, np.ones((3, 3), bool))
    return float(near[((ys + 0.5) * h / H).astype(int), ((xs + 0.5) * w / W).astype(int)].mean())


def spurious(src: np.ndarray, out: np.ndarray) -> float:
    """Fraction of white output pixels with no source outline pixel within 1 px of their location."""
    (H, W), (h, w) = src.shape, out.shape
    ys, xs = np.nonzero(src)
    hit = np.zeros((h, w), bool)
    hit[((ys + 0.5) * h / H).astype(int), ((xs + 0.5) * w / W).astype(int)] = True
    return float((out & ~binary_dilation(hit, np.ones((3, 3), bool))).sum() / max(out.sum(), 1))


@pytest.mark.parametrize("size", [56, 512])
def test_boundary_outlines_survive_resizing(size):
    src = random_boundary()
    png = encode_seg_png(torch.as_tensor(src))
    out = decode_boundary(png, size)[0].numpy() == 1.0          # the loader's resize
    assert out.shape == (size, size)
    assert coverage(src, out) >= 0.95 and spurious(src, out) == 0.0
    assert coverage(src, out) == 1.0                              # the max keeps every outline pixel
    nearest = np.asarray(Image.fromarray(src).resize((size, size), Image.NEAREST))
    if size == 56:
        assert coverage(src, nearest) < 0.5                       # what NEAREST did: broken outlines
    # a line stays thin: a 1-px horizontal / vertical line is one output row / column, not two
    line = np.zeros((480, 640), bool)
    line[100] = line[:, 300] = True
    small = resize_boundary(line, (size, size))
    assert small.sum() == 2 * size - 1 and small.any(1).sum() == size and small.all(1).sum() == 1


# ------------------------------------------------------------------------------------- the job

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def job_args(models, images: Path, out: Path, *extra: str) -> list[str]:
    depth_dir, sam_dir = models
    return ["--images", str(images), "--out", str(out), "--depth-model", str(depth_dir), "--sam-model",
            str(sam_dir), "--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
            "--device", "cpu", *extra]


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


@pytest.mark.slow
def test_bad_input_corpus_through_the_job(tmp_path, models):
    exif_jpeg, upright = exif_rotated()
    files = {"grey16.png": png16(GREY16), "rgb16.png": png16(RGB16), "cmyk.jpg": cmyk_jpeg(),
             "exif.jpg": exif_jpeg, "strip.png": encode(Image.new("RGB", (1, 700), (9, 9, 9)), "PNG"),
             "bomb.png": png_header_only(20_000, 20_000), "truncated.jpg": truncated_jpeg()}
    rows = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        rows.append(json.dumps({"key": name.replace(".", "_"), "path": str(tmp_path / name)}))
    # a path Python cannot even open (ValueError, not OSError): it used to kill the reader thread
    rows.append(json.dumps({"key": "nul", "path": str(tmp_path / "a\x00b.jpg")}))
    (tmp_path / "images.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    summary = job_main(job_args(models, tmp_path / "images.jsonl", out))
    assert summary["images_ok"] == 4 and summary["images_failed"] == 4
    finalize(out)
    reasons = {Path(r["path"]).name: r["reason"] for r in map(json.loads, (out / "report.jsonl").read_text().splitlines())}
    assert sorted(reasons) == ["a\x00b.jpg", "bomb.png", "strip.png", "truncated.jpg"]
    assert reasons["a\x00b.jpg"].startswith("unreadable:") and "ValueError" in reasons["a\x00b.jpg"]
    assert reasons["strip.png"].startswith("extreme aspect ratio:")
    assert reasons["bomb.png"].startswith("too large:")
    assert reasons["truncated.jpg"].startswith("truncated:")

    pix, depth, seg = (read_tar(out / s / "shard-000000.tar") for s in ("pix", "depth", "seg"))
    maker = DepthTargetMaker.from_pretrained(models[0])
    expected = {"grey16_png": np.repeat((GREY16 >> 8).astype(np.uint8)[..., None], 3, -1),
                "rgb16_png": (RGB16 >> 8).astype(np.uint8)}
    for key, want in expected.items():
        stored = pix[f"{key}.png"]                                          # the original 16-bit bytes
        assert np.array_equal(np.asarray(decode_rgb(stored)), want)         # what the loader will see
        # the depth target was computed from the correct pixels, not from an all-white image
        ref = maker(Image.fromarray(want))
        assert np.abs(decode_depth_png(depth[f"{key}.depth.png"]) - ref).max() <= 1 / 65535
    # EXIF: image, depth and boundary targets share the upright frame (20 wide, 40 tall)
    assert np.abs(np.asarray(decode_rgb(pix["exif_jpg.jpg"])).astype(int)[22:38] - upright[22:38]).max() <= 8
    assert decode_depth_png(depth["exif_jpg.depth.png"]).shape == (40, 20)
    assert Image.open(io.BytesIO(seg["exif_jpg.seg.png"])).size == (20, 40)
    assert np.asarray(decode_rgb(pix["cmyk_jpg.jpg"]))[8, 8].tolist() == pytest.approx([0, 255, 255], abs=6)


def _starts(log: Path, key: str) -> int:
    if not log.is_file():
        return 0
    return sum(1 for line in log.read_text().splitlines() if json.loads(line).get("start") == key)


@pytest.mark.slow
def test_sigkill_twice_on_an_image_makes_it_poison(tmp_path, models):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(6):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(path)
        rows.append(json.dumps({"key": f"img{i}", "path": str(path)}))
    (tmp_path / "images.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    args = job_args(models, tmp_path / "images.jsonl", out, "--shard-size", "3")
    log = out / "progress" / "shard-000001.log.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

    for attempt in (1, 2):   # the OOM killer, twice, while img4 is in the models
        proc = subprocess.Popen([sys.executable, "-m", "unimrg.targets.job", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while _starts(log, "img4") < attempt and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate()[0].decode(errors="replace")
        assert proc.returncode == -signal.SIGKILL, output[-3000:]
        assert _starts(log, "img4") == attempt
    assert (out / "progress" / "shard-000000.json").is_file()      # shard 0 finished in the first attempt
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    second = lines[[i for i, r in enumerate(lines) if "attempt" in r][1]:]
    assert not any("decode" in r for r in second)                   # after a death: decoded in order
    shard0 = {p: p.stat().st_mtime_ns for p in out.glob("*/shard-000000.tar")}

    # the re-run (with an exclusion list that also names an image of a finished shard) finishes
    exclude = tmp_path / "exclude.txt"
    exclude.write_text(f"# dropped by hand\nimg5\n{tmp_path / '0.jpg'}\n")
    summary = job_main([*args, "--exclude", str(exclude)])
    assert summary["shards_skipped"] == 1 and summary["images_ok"] == 1     # img3
    assert {p: p.stat().st_mtime_ns for p in shard0} == shard0              # finished shard untouched
    assert not log.exists()
    marker = json.loads((out / "progress" / "shard-000001.json").read_text())
    assert {f["key"]: f["reason"].split(":")[0] for f in marker["failed"]} == {"img4": "poison", "img5": "excluded"}
    assert sorted(read_tar(out / "depth" / "shard-000001.tar")) == ["img3.depth.png", "img3.jpg"]

    final = finalize(out)
    assert final["samples"] == 4 and final["failures_by_reason"] == {"poison": 1, "excluded": 1}
    report = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    poison = [r for r in report if r["reason"].startswith("poison")]
    assert [r["key"] for r in poison] == ["img4"] and "died 2 times" in poison[0]["reason"]
    assert json.loads((out / "progress" / "plan.json").read_text())["exclude"] is None   # the plan kept


@pytest.mark.slow
def test_sigterm_is_no_death(tmp_path, models, monkeypatch):
    """SLURM's preemption / time limit (SIGTERM, SIGKILL after a grace time) must not make an image suspect."""
    rows = []
    for i in range(3):
        Image.new("RGB", (40, 30 + i), (5, 6, 7)).save(tmp_path / f"{i}.jpg")
        rows.append(str(tmp_path / f"{i}.jpg"))
    (tmp_path / "images.txt").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    log = out / "progress" / "shard-000000.log.jsonl"

    # SIGTERM arrives while the first image is in the models. Sent from inside the models' call, not from a
    # watcher thread polling the log: three tiny images can finish between two polls, and the test then
    # saw no preemption at all (it was flaky in CI).
    real_parts = job.TargetMakers.parts

    def preempted(self, image):
        assert '"start"' in log.read_text()             # the image is logged as in the models
        os.kill(os.getpid(), signal.SIGTERM)             # Python runs the handler in this thread, right here
        return real_parts(self, image)

    monkeypatch.setattr(job.TargetMakers, "parts", preempted)
    with pytest.raises(SystemExit) as e:
        job_main(job_args(models, tmp_path / "images.txt", out))
    assert e.value.code == 128 + signal.SIGTERM
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    ends = [r["end"] for r in lines if "end" in r]     # (the reader thread may log a decode after it)
    assert len(ends) == 1 and ends[0].startswith("SystemExit"), lines
    assert sum("start" in r for r in lines) == 1 and not (out / "progress" / "shard-000000.json").exists()
    assert crashed_attempts(log) == []
    assert not list(out.glob("*/*.tmp-*"))
