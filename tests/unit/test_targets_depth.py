"""Depth targets (Appendix B.2): the original's resize rule, exact min-max, 16-bit storage.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_targets_depth.py -q
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from unimrg.data.loaders import decode_depth
from unimrg.targets.depth import (DepthTargetMaker, da2_input_size, da2_pixel_values, decode_depth_png,
                                  depth_to_rgb, encode_depth_png, normalize_depth, prediction_to_target)
from unimrg.targets.tiny import build_tiny_depth


@pytest.mark.parametrize("hw, expected", [
    ((375, 500), (518, 686)),    # the notes' example: transformers' processor gives 392x518 instead
    ((480, 640), (518, 686)),    # scale 518/480; width 690.7 -> nearest multiple of 14 = 686
    ((768, 1024), (518, 686)),   # downscale: the short side lands on 518 exactly
    ((1200, 800), (784, 518)),   # 777 = 55.5 * 14 rounds half to even -> 56 * 14
    ((518, 518), (518, 518)),
    ((100, 37), (1400, 518)),    # 1400.0 = 100 * 14: already a multiple
    ((300, 301), (518, 518)),    # 519.7 rounds to 518 (>= 518, so not bumped up)
    ((301, 300), (518, 518)),
    ((1000, 1043), (518, 546)),  # 540.3 -> 38.6 * 14 -> 39 * 14 = 546
    ((500, 520), (518, 532)),    # 538.7 -> 38.48 -> 38 * 14 = 532 (rounds down, still >= 518)
    ((372, 518), (518, 728)),    # 721.3 -> 51.52 -> 52 * 14
    ((519, 1554), (518, 1554)),  # 518 * 519/519 may be 517.99..: must still give 518, not 504
])
def test_resize_rule_matches_original(hw, expected):
    assert da2_input_size(*hw) == expected
    h, w = da2_input_size(*hw)
    assert h >= 518 and w >= 518 and h % 14 == 0 and w % 14 == 0


def test_pixel_values_shape_and_normalisation():
    img = Image.new("RGB", (500, 375), (124, 116, 104))   # ~ the ImageNet mean colour
    x = da2_pixel_values(img)
    assert x.shape == (1, 3, 518, 686) and x.dtype == torch.float32
    # bicubic keeps a constant image constant; then (v/255 - mean) / std per channel
    expected = (torch.tensor([124, 116, 104], dtype=torch.float64) / 255 - torch.tensor([0.485, 0.456, 0.406],
                dtype=torch.float64)) / torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
    assert torch.allclose(x[0, :, 10, 10].double(), expected, atol=1e-6)
    assert torch.allclose(x, x[..., :1, :1].expand_as(x), atol=1e-6)


def test_normalisation_exact_on_known_prediction():
    pred = torch.tensor([[2.0, 4.0, 6.0], [10.0, 8.0, 2.5]])
    d = prediction_to_target(pred, 2, 3)                  # same size: align_corners bilinear is the identity
    assert torch.equal(d, (pred - 2.0) / 8.0)
    assert d.min() == 0 and d.max() == 1


def test_bilinear_back_to_original_size_align_corners():
    pred = torch.tensor([[0.0, 1.0], [2.0, 3.0]])        # (h', w') = (2, 2) -> (3, 3): corners kept
    d = prediction_to_target(pred, 3, 3)
    expected = torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]) / 3.0
    assert torch.allclose(d, expected, atol=1e-7, rtol=0)
    assert d[0, 0] == 0 and d[2, 2] == 1


def test_flat_prediction_gives_zeros_not_nan():
    # bilinear resizing of a constant leaves ulp noise (3.25 -> 3.2500002): still "flat"
    for pred in (torch.full((37, 49), 3.25), torch.zeros(5, 5), torch.full((4, 4), -7.1)):
        d = prediction_to_target(pred, 20, 30)
        assert d.shape == (20, 30) and torch.isfinite(d).all() and (d == 0).all()
    assert (normalize_depth(torch.full((3,), float("nan"))) == 0).all()
    tiny_range = torch.tensor([1e-3, 2e-3])                # small but real: normalised, not zeroed
    assert torch.equal(normalize_depth(tiny_range), torch.tensor([0.0, 1.0]))


def test_16_bit_storage_roundtrip_and_loader():
    d = np.linspace(0, 1, 7 * 11, dtype=np.float32).reshape(7, 11)
    png = encode_depth_png(d)
    img = Image.open(__import__("io").BytesIO(png))
    assert img.mode.startswith("I") and np.asarray(img).max() == 65535   # 16-bit, not 8-bit
    back = decode_depth_png(png)
    assert np.abs(back - d).max() <= 0.5 / 65535 + 1e-7
    assert len(np.unique(back)) == d.size                                  # no 8-bit quantisation
    loaded = decode_depth(png, 11)                                         # the trainer's decoder
    assert loaded.shape == (1, 11, 11) and loaded.max() == 1.0 and loaded.min() == 0.0
    rgb = depth_to_rgb(back)
    assert rgb.shape == (7, 11, 3) and (rgb[..., 0] == rgb[..., 2]).all()


def test_maker_on_tiny_model_returns_original_size():
    maker = DepthTargetMaker(build_tiny_depth(0))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8))
    pred = maker.predict(img)
    assert pred.shape == (518, 686)                       # the network saw the original's input size
    d = maker(img)
    assert d.shape == (75, 100) and d.dtype == np.float32
    assert d.min() == 0.0 and d.max() == 1.0
