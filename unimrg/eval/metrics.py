"""Evaluation metrics on [0, 1] maps and scene-question answers (used in training and by eval jobs).

    python -m pytest -q tests/unit/test_eval_metrics.py

Every map function takes a prediction and a target as float tensors in [0, 1] shaped (H, W), (C, H, W)
or batched (B, C, H, W), converts the prediction to the target's form (one channel, the target's size)
and returns one value per image (a (B,) tensor; a scalar tensor for unbatched input):

* ``depth_similarity`` — UniMRG §4.4: 1 − mean |pred − target|. A generated depth image is RGB; it is
  converted to one channel by ITU-R 601 luma (what PIL's ``convert("L")`` does) and resized to the
  target bilinearly (antialiased). 1 = identical, 0 = maximally wrong.
* ``seg_boundary_f1`` — boundary F-measure in the BSDS style: prediction and target are binarised at
  0.5, a predicted boundary pixel is correct if a target boundary pixel lies within ``tolerance``
  pixels (Euclidean) and vice versa for recall; F = 2PR / (P + R). The default tolerance is BSDS's
  0.0075 × the image diagonal, at least 1 pixel (1 px at 56–188 px images). Difference from the BSDS
  benchmark code: pixels are matched by distance only, not one-to-one (no bipartite assignment), so
  thick predicted edges near a true edge are not penalised beyond precision's dilation test. Both maps
  empty → 1 (nothing to find, nothing found); exactly one empty → 0.
* ``recon_psnr`` — 10 · log10(1 / MSE) over all channels on [0, 1] (dB), prediction resized to the
  target; identical images give ``max_psnr`` (100 dB) instead of infinity.

``OTHER_IMAGE``: the suffix of a map metric scored against *another* image's target (the eval job pairs
each item with the next in its batch, the in-training eval with the next held-out image). A map that ignores
its input (the constant mean depth map) scores the same both ways on average, so the gap between
``depth_similarity`` and ``depth_similarity/other_image`` is how much the maps follow their own image.

``answer_correct`` / ``und_accuracy`` score free-form answers to the scene questions
(``unimrg.data.scenes``): both strings are normalised (lower case, punctuation and articles dropped,
number words → digits) and the prediction is correct when its first words are the reference's words
("The red sphere." ← "red sphere, it is nearer"; "Yes." ← "yes"; "3" ← "three objects").
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from unimrg.tasks import DEPTH, SEG

LUMA = (0.299, 0.587, 0.114)
OTHER_IMAGE = "/other_image"   # see the module docstring
MAX_PSNR = 100.0


def _as_batch(x: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
    """(H, W) | (C, H, W) | (B, C, H, W) → float (B, C, H, W) and whether the input was batched."""
    x = torch.as_tensor(x)
    if x.dim() == 2:
        return x[None, None].float(), False
    if x.dim() == 3:
        return x[None].float(), False
    if x.dim() == 4:
        return x.float(), True
    raise ValueError(f"{what}: expected (H, W), (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")


def _one_channel(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    if x.shape[1] == 3:
        w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def _to_size(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def _pair(pred, target, what: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    p, batched_p = _as_batch(pred, f"{what} prediction")
    t, batched_t = _as_batch(target, f"{what} target")
    if p.shape[0] != t.shape[0]:
        raise ValueError(f"{what}: {p.shape[0]} predictions but {t.shape[0]} targets")
    return p, t, batched_p or batched_t


def depth_similarity(pred, target) -> torch.Tensor:
    """§4.4: 1 − mean |pred − target| per image (pred → one channel, resized to the target)."""
    p, t, batched = _pair(pred, target, "depth_similarity")
    t = _one_channel(t)
    p = _to_size(_one_channel(p), t.shape[-2:]).clamp(0, 1)
    out = 1.0 - (p - t).abs().flatten(1).mean(dim=1)
    return out if batched else out[0]


def default_tolerance(height: int, width: int) -> int:
    """BSDS's maxDist (0.0075 of the diagonal) in whole pixels, at least 1."""
    return max(1, math.ceil(0.0075 * math.hypot(height, width) - 1e-9))


def _dilate(edges: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary (B, 1, H, W) → pixels within Euclidean ``radius`` of a set pixel."""
    r = radius
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    disk = ((yy ** 2 + xx ** 2) <= r * r).float()[None, None]
    return F.conv2d(edges.float(), disk, padding=r) > 0


def seg_boundary_f1(pred, target, tolerance: int | None = None) -> torch.Tensor:
    """Boundary F-measure per image (see the module docstring); maps are boundary images (white = edge)."""
    p, t, batched = _pair(pred, target, "seg_boundary_f1")
    t = _one_channel(t) >= 0.5
    p = _to_size(_one_channel(p), t.shape[-2:], mode="nearest") >= 0.5
    tol = default_tolerance(*t.shape[-2:]) if tolerance is None else tolerance
    near_t, near_p = _dilate(t, tol), _dilate(p, tol)
    n_p, n_t = p.flatten(1).sum(1).double(), t.flatten(1).sum(1).double()
    precision = (p & near_t).flatten(1).sum(1).double() / n_p.clamp(min=1)
    recall = (t & near_p).flatten(1).sum(1).double() / n_t.clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(precision))
    f1 = torch.where((n_p == 0) & (n_t == 0), torch.ones_like(f1), f1).float()
    return f1 if batched else f1[0]


def recon_psnr(pred, target, max_psnr: float = MAX_PSNR) -> torch.Tensor:
    """PSNR in dB per image on [0, 1] (pred resized to the target)."""
    p, t, batched = _pair(pred, target, "recon_psnr")
    if p.shape[1] != t.shape[1]:
        p, t = _one_channel(p), _one_channel(t)
    p = _to_size(p, t.shape[-2:]).clamp(0, 1)
    mse = ((p.double() - t.double()) ** 2).flatten(1).mean(dim=1)
    out = torch.where(mse > 0, -10 * torch.log10(mse.clamp(min=1e-300)), torch.full_like(mse, max_psnr))
    out = out.clamp(max=max_psnr).float()
    return out if batched else out[0]


# The map metrics scored against a task's target maps (and, with OTHER_IMAGE, against another image's):
# task → (metric name, metric). recon_psnr is scored against the input image instead.
MAP_METRICS = {DEPTH: ("depth_similarity", depth_similarity), SEG: ("seg_boundary_f1", seg_boundary_f1)}


# ---- scene questions ------------------------------------------------------------------------------
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
ARTICLES = {"the", "a", "an"}


def normalise_answer(text: str) -> list[str]:
    """Lower case, punctuation → spaces, articles dropped, number words → digits; the words."""
    words = re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()
    return [NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES]


def answer_correct(prediction: str, reference: str) -> bool:
    """The prediction's first words are the reference's words (after :func:`normalise_answer`)."""
    ref, pred = normalise_answer(reference), normalise_answer(prediction)
    return bool(ref) and pred[:len(ref)] == ref


def question_type(kind: str, answer: str) -> str:
    """Scene QA kinds; an "exists" question about an absent object is a hallucination probe."""
    if kind == "exists" and normalise_answer(answer) == ["no"]:
        return "hallucination"
    return kind


def und_accuracy(records: Iterable[tuple[str, str, str]]) -> dict[str, float]:
    """(question type, prediction, reference) triples → {"all": acc, <type>: acc, ...} in [0, 1]."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for kind, pred, ref in records:
        ok = answer_correct(pred, ref)
        hits[kind].append(ok)
        hits["all"].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def mean(values: Sequence[float] | torch.Tensor) -> float:
    v = torch.as_tensor(values, dtype=torch.float64)
    return float(v.mean()) if v.numel() else float("nan")
