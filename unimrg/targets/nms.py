"""Greedy box non-maximum suppression in plain torch (no torchvision).

Same semantics as ``torchvision.ops.nms`` (pytorch/vision ``torchvision/csrc/ops/cpu/nms_kernel.cpp``):
boxes in (x1, y1, x2, y2), area ``(x2 - x1) * (y2 - y1)`` (no +1), candidates visited by decreasing
score, a box is suppressed when its IoU with a kept box is ``> iou_threshold`` (IoU computed in the
boxes' float dtype, compared against the threshold in double precision), kept indices returned by
decreasing score. ``batched_nms`` with a single class (what SAM's automatic mask generator calls) is
plain NMS.
"""

from __future__ import annotations

import numpy as np
import torch


def box_iou_matrix(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``boxes`` (N, 4) xyxy → (N, N), in the boxes' float dtype."""
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1) * (y2 - y1)                                   # (N,)
    w = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None])).clamp_min(0)
    h = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None])).clamp_min(0)
    inter = w * h                                                  # (N, N)
    # same association as torchvision: inter / (area_i + area_j - inter)
    return inter / (area[:, None] + area[None] - inter)


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64, on ``boxes.device``) of the boxes kept by greedy NMS, highest score first.

    Args:
        boxes: (N, 4) xyxy, any numeric dtype (cast to float32 like SAM's ``boxes.float()``).
        scores: (N,) scores; ties keep the lower index first (stable sort).
        iou_threshold: suppress boxes whose IoU with an already kept box is strictly greater.
    """
    device = boxes.device
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    boxes = boxes.float()
    order = torch.sort(scores, descending=True, stable=True).indices
    # One (N, N) IoU matrix on the device, then a cheap greedy pass over booleans on the CPU:
    # N is at most a few thousand candidate masks per image.
    over = (box_iou_matrix(boxes[order]).double() > iou_threshold).cpu().numpy()  # (N, N) in score order
    n = over.shape[0]
    removed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        removed |= over[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]
