"""Findings as regions of a two-class mask: a mask task's regions, and a detection task's boxes read off them.

A region is a connected set (faces touching) of pixels whose foreground probability reaches the mask's
threshold; its score is its mean foreground probability. Calibration on validation data
(:func:`medexplore.train.calibration.calibrate_inference`) can set, per mask task, the score a region
needs to be kept (small, hesitant regions are most of the false alarms on a healthy image), and pair a
detection task with the mask task of the same finding when the kept regions' boxes score better than the box
head's (on the embedded lesions: validation F0.5 0.85 against 0.70 for ``medformer-medmnist-embedded-v2``).
It also sets, per mask task and dimensionality, the fewest pixels a region needs: most false regions on real
images are one to a few voxels (``medformer-medmnist-embedded-v4`` on MedMNIST 3D volumes: median 1, 90th
percentile 6), and a lesion the model was taught spans tens to hundreds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from ..errors import UserError
from .kinds import kind_entry
from .tasks import TaskSpec

__all__ = ["Regions", "check_pairs", "mask_regions"]


def check_pairs(tasks: dict[str, TaskSpec], paired_masks: dict[str, str]) -> None:
    """Refuse a pairing that does not name a detection task and a two-class segmentation task of ``tasks``."""
    for boxes, mask in paired_masks.items():
        box_spec, mask_spec = tasks.get(boxes), tasks.get(mask)
        if box_spec is None or kind_entry(box_spec.kind).output != "boxes":
            raise UserError(f"inference paired_masks: {boxes!r} is not a detection task of the model")
        if mask_spec is None or kind_entry(mask_spec.kind).output != "mask" or mask_spec.num_outputs != 2:
            raise UserError(f"inference paired_masks: {boxes!r} is paired with {mask!r}, "
                            "which is not a two-class segmentation task of the model")


@dataclass(frozen=True)
class Regions:
    """The connected regions (faces touching) of a two-class mask: ``labels`` (0 outside, 1..N), their (N, 2d)
    bounding ``boxes`` in corner form, (N,) ``scores``, each region's mean foreground probability, and (N,)
    ``sizes`` in pixels."""

    labels: np.ndarray
    boxes: Tensor
    scores: Tensor
    sizes: np.ndarray

    def kept(self, min_score: float, min_size: int = 1) -> np.ndarray:
        """(N,) whether each region's score reaches ``min_score`` and its size ``min_size``."""
        return (self.scores.numpy() >= min_score) & (self.sizes >= min_size)

    def mask(self, min_score: float, min_size: int = 1) -> np.ndarray:
        """The boolean mask of the :meth:`kept` regions."""
        return np.concatenate([[False], self.kept(min_score, min_size)])[self.labels]

    def scored_boxes(self, min_score: float, min_size: int = 1) -> tuple[Tensor, Tensor]:
        """The boxes and scores of the :meth:`kept` regions."""
        kept = torch.from_numpy(self.kept(min_score, min_size))
        return self.boxes[kept], self.scores[kept]


def mask_regions(foreground, threshold: float) -> Regions:
    """The :class:`Regions` where ``foreground`` (probabilities over the spatial axes) reaches ``threshold``."""
    foreground = np.asarray(foreground, dtype=np.float32)
    labels, count = ndimage.label(foreground >= threshold)
    boxes = torch.tensor([[s.start for s in region] + [s.stop for s in region]
                          for region in ndimage.find_objects(labels)], dtype=torch.float32)
    scores = ndimage.mean(foreground, labels, np.arange(1, count + 1)) if count else np.zeros(0)
    return Regions(labels, boxes.reshape(count, 2 * foreground.ndim), torch.as_tensor(np.asarray(scores), dtype=torch.float32),
                   np.bincount(labels.ravel(), minlength=count + 1)[1:])
