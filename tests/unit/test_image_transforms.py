"""Each adapter's released image transforms on non-square images, against numbers worked out from the
official pipelines (by hand where the sizes allow, else by the official steps in plain PIL / numpy).

    python -m pytest tests/unit/test_image_transforms.py -q
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from unimrg.data.loaders import decode_task_parts
from unimrg.data.transforms import STRETCH_ALL, Fit
from unimrg.models import registry
from unimrg.models.base import ModelConfig
from unimrg.tasks import DEPTH, PIX, SEG, UND


def picture(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def released(name: str):
    return registry.adapter_class(name).image_transforms(ModelConfig(name=name))


def test_every_registered_model_declares_its_released_transforms():
    for name in registry.names():
        cls = registry.adapter_class(name)
        assert cls.release_transforms is not None, f"{name}: set release_transforms (unimrg/data/transforms.py)"
        assert cls.image_transforms(ModelConfig(name=name, preprocessing="stretch")) == STRETCH_ALL
    with pytest.raises(ValueError, match="model.preprocessing='squash'"):
        registry.adapter_class("harmon").image_transforms(ModelConfig(preprocessing="squash"))


def test_harmon_pads_understanding_images_with_grey_127_and_stretches_generation():
    t = released("harmon")
    a = picture(4, 2)
    # expand2square: a 4×2 image pasted at (0, (4 - 2) // 2) on a 4×4 grey-127 canvas; 4 px = no resize.
    want = np.full((4, 4, 3), 127, np.uint8)
    want[1:3] = a
    assert np.array_equal(np.asarray(t.understanding.rgb(Image.fromarray(a), 4)), want)
    # With a resize (6×4 → 3): MARProcessor's steps in plain PIL.
    b = picture(6, 4, seed=1)
    canvas = Image.new("RGB", (6, 6), (127, 127, 127))
    canvas.paste(Image.fromarray(b), (0, 1))
    want = np.asarray(canvas.resize((3, 3), Image.BICUBIC))
    assert np.array_equal(np.asarray(t.understanding.rgb(Image.fromarray(b), 3)), want)
    # Generation (crop_image=False): stretched, condition and target alike.
    want = np.asarray(Image.fromarray(b).resize((3, 3), Image.BICUBIC))
    image, target = decode_task_parts(PIX, {"png": png(b)}, "png", 3, 3, t)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), want)
    assert torch.equal(target, image.float() / 255)


def test_showo_clip_input_and_magvit_target_are_short_side_centre_crops():
    t = released("showo")
    a = picture(6, 3)
    # Shorter side already 3: no resize; a 6-wide row cropped to 3: CLIPImageProcessor (transformers'
    # center_crop) starts at (6 - 3) // 2 = 1, torchvision's CenterCrop at round(1.5) = 2.
    assert np.array_equal(np.asarray(t.understanding.rgb(Image.fromarray(a), 3)), a[:, 1:4])
    assert np.array_equal(np.asarray(t.condition.rgb(Image.fromarray(a), 3)), a[:, 1:4])
    assert np.array_equal(np.asarray(t.target.rgb(Image.fromarray(a), 3)), a[:, 2:5])
    # 46×24 at 12: shorter side 24 → 12, longer int(12 · 46 / 24) = 23; crops at 11 // 2 = 5 and round(5.5) = 6.
    b = Image.fromarray(picture(46, 24, seed=2))
    small = b.resize((23, 12), Image.BICUBIC)
    assert np.array_equal(np.asarray(t.understanding.rgb(b, 12)), np.asarray(small)[:, 5:17])
    assert np.array_equal(np.asarray(t.target.rgb(b, 12)), np.asarray(small)[:, 6:18])


def test_showo_targets_stay_aligned_with_the_picture_and_keep_their_outline():
    t = released("showo")
    # A picture bright in column 30 only, its boundary map with that column, and a depth ramp equal to
    # the picture's red channel: after the target transform they must still coincide.
    w, h = 46, 24
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w).round().astype(np.uint8)[None]
    a[:, 30, 1] = 255
    line = np.zeros((h, w), bool)
    line[:, 30] = True
    ramp = (a[..., 0].astype(np.float32) / 255)
    depth_png = png((ramp * 65535).round().astype(np.uint16))
    parts = {"png": png(a), "depth.png": depth_png, "seg.png": png(line.astype(np.uint8) * 255)}
    pix_img, pix = decode_task_parts(PIX, parts, "png", 12, 12, t)
    _, depth = decode_task_parts(DEPTH, parts, "png", 12, 12, t)
    _, seg = decode_task_parts(SEG, parts, "png", 12, 12, t)
    assert np.abs(pix[0, :, 1:-1].numpy() - depth[0, :, 1:-1].numpy()).max() < 2 / 255   # same ramp, same crop
    brightest = int(pix[1].mean(0).argmax())
    assert seg[0].any(0).nonzero()[:, 0].tolist() == [brightest]                       # the line, where the picture has it
    # A 1-px rectangle outline (rows 2 / 21, columns 14 / 33, all even: NEAREST's 2× shrink samples odd
    # ones only) survives: rows → floor((y + .5) / 2) = 1 / 10, columns → 7 / 16, minus the crop's 6.
    box = np.zeros((h, w), bool)
    box[2, 14:34] = box[21, 14:34] = box[2:22, 14] = box[2:22, 33] = True
    want = np.zeros((12, 12), bool)
    want[1, 1:11] = want[10, 1:11] = want[1:11, 1] = want[1:11, 10] = True
    assert np.array_equal(t.target.boundary(box, 12), want)


def test_openuni_crops_the_target_centre_and_resizes_the_condition_bilinearly_without_antialias():
    t = released("openuni")
    a = picture(6, 4, seed=3)
    # Target: the centred 4×4 square (offset (6 - 4) // 2 = 1) at 4 px = no resize.
    image, target = decode_task_parts(PIX, {"png": png(a)}, "png", 2, 4, t)
    assert torch.equal(target, torch.from_numpy(a[:, 1:5]).permute(2, 0, 1).float() / 255)
    # Condition 4 → 2, bilinear without antialias (align_corners=False): output pixel i samples source
    # 2i + 0.5, i.e. the mean of each 2×2 block. (Antialiased bilinear would weigh 4×4 pixels.)
    crop = a[:, 1:5].astype(np.float64)
    want = crop.reshape(2, 2, 2, 2, 3).mean(axis=(1, 3))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), np.round(want).astype(np.uint8))
    # Understanding: InternVL's single tile, the whole image resized to a square (PIL bicubic).
    und, _ = decode_task_parts(UND, {"png": png(a)}, "png", 3, 4, t)
    assert np.array_equal(und.permute(1, 2, 0).numpy(), np.asarray(Image.fromarray(a).resize((3, 3), Image.BICUBIC)))


def test_fit_geometry_rules():
    assert Fit("crop").geometry(5, 9, 4).pre_crop == (0, 2, 5, 7)
    assert Fit("crop", offset="round").geometry(5, 10, 4).pre_crop == (0, 2, 5, 7)     # round(2.5) = 2
    assert Fit("pad").geometry(3, 8, 4).pad == (8, 2, 0)
    g = Fit("short_side_crop").geometry(24, 46, 12)
    assert g.resize == (12, 23) and g.post_crop == (0, 5, 12, 17)
    # depth maps are padded with 0 (the picture with grey), at the same place
    d = Fit("pad").depth(np.ones((2, 4), np.float32), 4)
    assert d[0].sum() == 0 and d[3].sum() == 0 and (d[1:3] == 1).all()
    with pytest.raises(ValueError, match="image fit 'squash'"):
        Fit("squash")


def test_eval_job_questions_see_the_understanding_transform_and_maps_the_whole_image(tmp_path):
    from unimrg.config import load_config
    from unimrg.eval.job import Unit, Worker
    cls = registry.adapter_class("showo")
    cfg = load_config(model="showo", overrides=["model.image_size=3"])
    worker = Worker(None, cfg, cls.__new__(cls), "cpu")   # only the adapter's class is read
    a = picture(6, 3, seed=4)
    path = tmp_path / "wide.png"
    path.write_bytes(png(a))
    question, _ = worker.image(Unit("q", path, str(path), prompt="What is this?"))
    assert np.array_equal(question.permute(1, 2, 0).numpy(), a[:, 1:4])            # CLIP's centre crop
    whole, _ = worker.image(Unit("g", path, str(path), tasks=(DEPTH,)))
    assert np.array_equal(whole.permute(1, 2, 0).numpy(), np.asarray(Image.fromarray(a).resize((3, 3), Image.BICUBIC)))


def test_long_side_pad_for_siglip_style_processors():
    # transformers' JanusImageProcessor: longer side → S, shorter max(round(S · short / long), 14), then
    # centred grey padding. 4×2 at 4: no resize, rows 1–2 the picture, rows 0 and 3 grey.
    a = picture(4, 2, seed=5)
    fit = Fit("long_side_pad", fill=127, min_side=1)
    want = np.full((4, 4, 3), 127, np.uint8)
    want[1:3] = a
    assert np.array_equal(np.asarray(fit.rgb(Image.fromarray(a), 4)), want)
    g = Fit("long_side_pad", min_side=14).geometry(100, 10, 50)
    assert g.resize == (50, 14) and g.post_pad == (50, 0, 18)       # round(5) = 5 < 14: floored to 14
    d = fit.depth(np.ones((2, 4), np.float32), 4)
    assert (d[1:3] == 1).all() and d[0].sum() == 0 and d[3].sum() == 0
