"""Metric definitions on inputs whose values are worked out by hand.

    python -m pytest -q tests/unit/test_eval_metrics.py
"""

from __future__ import annotations

import pytest
import torch

from unimrg.data.scenes import make_scene
from unimrg.eval import metrics as M


def test_identical_maps_score_one():
    sc = make_scene(0, 0, 56)
    depth = torch.from_numpy(sc.depth)[None]                             # (1, H, W)
    edges = torch.from_numpy(sc.boundary).permute(2, 0, 1).float() / 255  # (3, H, W)
    assert M.depth_similarity(depth, depth).item() == pytest.approx(1.0)
    assert M.seg_boundary_f1(edges, edges).item() == 1.0
    assert M.recon_psnr(edges, edges).item() == M.MAX_PSNR


def test_constant_depth_prediction():
    # target: columns 0, 1/3, 2/3, 1; prediction 0.5 → |error| 1/2, 1/6, 1/6, 1/2 → MAE 1/3.
    target = torch.linspace(0, 1, 4).repeat(4, 1)
    assert M.depth_similarity(torch.full((4, 4), 0.5), target).item() == pytest.approx(2 / 3)
    # an RGB prediction is turned into one channel by luma before comparing: pure red = 0.299
    red = torch.zeros(3, 8, 8)
    red[0] = 1
    assert M.depth_similarity(red, torch.full((8, 8), 0.299)).item() == pytest.approx(1.0, abs=1e-6)
    # a prediction at another size is resized to the target: a constant stays constant
    assert M.depth_similarity(torch.full((3, 16, 16), 0.5), target).item() == pytest.approx(2 / 3)


def test_constant_boundary_prediction():
    # target: one vertical edge (column 5) in 10 × 10; prediction: every pixel an edge. Tolerance 1 px
    # → 30 predicted pixels (columns 4-6) are near the edge: P = 0.3, R = 1, F = 0.6 / 1.3 = 6/13.
    target = torch.zeros(10, 10)
    target[:, 5] = 1
    assert M.seg_boundary_f1(torch.ones(10, 10), target, tolerance=1).item() == pytest.approx(6 / 13)
    assert M.seg_boundary_f1(torch.zeros(10, 10), target).item() == 0.0
    # an edge shifted by one pixel is within the tolerance; by three it is not
    assert M.seg_boundary_f1(target.roll(1, dims=1), target, tolerance=1).item() == 1.0
    assert M.seg_boundary_f1(target.roll(3, dims=1), target, tolerance=1).item() == 0.0
    assert M.seg_boundary_f1(torch.zeros(4, 4), torch.zeros(4, 4)).item() == 1.0
    assert M.default_tolerance(56, 56) == 1 and M.default_tolerance(512, 512) == 6


def test_psnr_of_known_noise():
    # ±0.1 around 0.5 → MSE 0.01 → PSNR 20 dB, whatever the sign pattern
    target = torch.full((2, 3, 8, 8), 0.5)
    signs = torch.randint(0, 2, target.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    got = M.recon_psnr(target + 0.1 * signs, target)
    assert got.shape == (2,)
    assert torch.allclose(got, torch.full((2,), 20.0), atol=1e-4)


def test_answers_and_accuracy_per_type():
    assert M.answer_correct("the red sphere is closer", "The red sphere.")
    assert not M.answer_correct("The blue sphere.", "The red sphere.")
    assert M.answer_correct("three", "3") and M.answer_correct("Yes, there is.", "Yes.")
    assert not M.answer_correct("", "No.")
    assert M.question_type("exists", "No.") == "hallucination" and M.question_type("exists", "Yes.") == "exists"
    acc = M.und_accuracy([("count", "3", "3"), ("count", "2", "3"), ("left_right", "Left.", "Left.")])
    assert acc == {"all": 2 / 3, "count": 0.5, "left_right": 1.0}
