"""Axis-aligned box operations for any dimensionality.

A box is ``(lo_0, ..., lo_{d-1}, hi_0, ..., hi_{d-1})`` in array axis order: ``(y1, x1, y2, x2)``
in 2D, ``(z1, y1, x1, z2, y2, x2)`` in 3D.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_volume", "box_iou", "generalized_box_iou", "center_size_to_corners"]


def _split(boxes: Tensor) -> tuple[Tensor, Tensor]:
    d = boxes.shape[-1] // 2
    return boxes[..., :d], boxes[..., d:]


def box_volume(boxes: Tensor) -> Tensor:
    lo, hi = _split(boxes)
    return (hi - lo).clamp(min=0).prod(-1)


def _intersection_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    (alo, ahi), (blo, bhi) = _split(a[:, None]), _split(b[None])
    inter = (torch.minimum(ahi, bhi) - torch.maximum(alo, blo)).clamp(min=0).prod(-1)
    union = box_volume(a)[:, None] + box_volume(b)[None] - inter
    return inter, union


def box_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """(N, M) IoU between (N, 2d) and (M, 2d) boxes."""
    inter, union = _intersection_union(a, b)
    return inter / (union + eps)


def generalized_box_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """(N, M) generalised IoU (Rezatofighi et al. 2019) in [-1, 1]."""
    inter, union = _intersection_union(a, b)
    (alo, ahi), (blo, bhi) = _split(a[:, None]), _split(b[None])
    hull = (torch.maximum(ahi, bhi) - torch.minimum(alo, blo)).clamp(min=0).prod(-1)
    return inter / (union + eps) - (hull - union) / (hull + eps)


def center_size_to_corners(center_size: Tensor) -> Tensor:
    center, size = _split(center_size)
    return torch.cat([center - size / 2, center + size / 2], -1)
