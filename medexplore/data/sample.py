"""The image-centric Sample and its collation into the model's packed Batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import UserError
from ..models.packing import Batch
from ..models.tasks import Domain

__all__ = ["Sample", "collate", "check_image"]


@dataclass
class Sample:
    """One image, its domain and any subset of its annotations.

    Attributes:
        image: float tensor ``(C, H, W)`` or ``(C, D, H, W)``.
        domain: dimensionality, modality and body part.
        labels: per task name, the label (class index, vector, mask, boxes...); absent = unknown.
        spacing: physical size of a pixel/voxel along each spatial axis (mm), if known.
        patient_id: for patient-level splits and out-of-distribution tests.
        meta: anything else (source file, affine...).
    """

    image: Tensor
    domain: Domain
    labels: dict[str, Any] = field(default_factory=dict)
    spacing: tuple[float, ...] | None = None
    patient_id: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        check_image(self.image, self.meta.get("source", "sample"), self.domain)


def check_image(image: Tensor, where: str, domain: Domain | None = None) -> None:
    """Raise a ValueError naming ``where`` for a non-tensor, a wrong rank or non-finite pixels."""
    if not isinstance(image, Tensor):
        raise UserError(f"{where}: image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() not in (3, 4):
        raise UserError(f"{where}: image must be (C, H, W) or (C, D, H, W), got shape {tuple(image.shape)}")
    if domain is not None and image.dim() - 1 != domain.dims:
        raise UserError(f"{where}: image shape {tuple(image.shape)} does not match its {domain.dimensionality} domain")
    if image.is_floating_point() and not torch.isfinite(image).all():
        bad = int((~torch.isfinite(image)).sum())
        raise UserError(f"{where}: image has {bad} NaN/Inf pixel(s)")


def collate(samples: Sequence[Sample], tasks: Sequence[str] | None = None) -> Batch:
    """Pack samples into a :class:`Batch`; labels a sample lacks become ``None``.

    ``tasks`` fixes the label keys (default: every label name in the samples).
    """
    if not samples:
        raise UserError("collate: empty list of samples")
    names = list(tasks) if tasks is not None else sorted({k for s in samples for k in s.labels})
    targets = {name: [s.labels.get(name) for s in samples] for name in names}
    meta = {"patient_id": [s.patient_id for s in samples], "spacing": [s.spacing for s in samples],
            "source": [s.meta.get("source") for s in samples], "index": [s.meta.get("index") for s in samples]}
    return Batch.from_images([s.image for s in samples], [s.domain for s in samples], targets, meta)
