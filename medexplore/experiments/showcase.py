"""What the notebooks look at: the shipped MedMNIST model on the real MedMNIST test images when the official
files are on this machine, else the notebooks' example model on the embedded data.

Example:
    >>> show = showcase()                       # doctest: +SKIP
    >>> show.source, len(show.test)              # doctest: +SKIP
    ('medformer-medmnist5-v1 on the official MedMNIST test splits in ../shared/data/medmnist', 1860)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from ..data.embedded import EmbeddedDataset
from ..data.medmnist import MedMNIST, medmnist_path
from ..data.sample import Sample
from ..models.medformer import Medformer
from ..pretrained import pretrained_models
from ..train.checkpoint import load_model
from .demo import example_run

__all__ = ["SHIPPED_MEDMNIST", "Showcase", "ExplainCase", "official_medmnist_root", "showcase"]

SHIPPED_MEDMNIST = "medformer-medmnist5-v1"
REPOSITORY_SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "medmnist"  # ../shared beside the checkout


def official_medmnist_root(root: str | Path | None = None) -> Path | None:
    """The first of ``root``, ``$MEDMNIST_ROOT`` and ``../shared/data/medmnist`` (beside the repository)
    holding a 28-px file of a task of the shipped MedMNIST model; None when none does."""
    flags = pretrained_models()[SHIPPED_MEDMNIST].tasks  # one task per MedMNIST flag
    for candidate in (root, os.environ.get("MEDMNIST_ROOT"), REPOSITORY_SHARED):
        if candidate and any(medmnist_path(flag, 28, candidate).exists() for flag in flags):
            return Path(candidate)
    return None


@dataclass
class ExplainCase:
    """One image to explain: the sample, the task output explained (``target``: the class of a mask task)
    and the true mask to outline, where there is one."""

    sample: Sample
    task: str
    target: int | None
    mask: np.ndarray | None
    title: str


@dataclass
class Showcase:
    """A model, its validation and test images, and where they come from."""

    model: Medformer
    val: Dataset
    test: Dataset
    source: str
    real: bool

    def case(self, dimensionality: str) -> ExplainCase:
        """The first positive test image of ``dimensionality`` and what to explain on it: on the embedded
        data lesion presence (2D) or grey matter (3D) with their true masks; on MedMNIST the image's
        own diagnosis (pneumonia, adrenal hyperplasia, ...)."""
        for index in range(len(self.test)):
            sample = self.test[index]
            if sample.domain.dimensionality != dimensionality:
                continue
            if not self.real and sample.labels.get("lesion") == 1:
                if dimensionality == "2d":
                    return ExplainCase(sample, "lesion", None, sample.labels["lesion_mask"].numpy(),
                                       f"2D {sample.domain.modality}: lesion presence")
                return ExplainCase(sample, "tissue", 2, (sample.labels["tissue"] == 2).numpy(), "3D MRI: grey matter")
            task, label = next(iter(sample.labels.items()))
            if self.real and self.model.tasks[task].kind == "binary" and label == 1:
                return ExplainCase(sample, task, None, None, f"{dimensionality.upper()} {sample.domain.modality} "
                                                            f"{sample.domain.body_part}: {task} (label 1)")
        raise LookupError(f"no positive {dimensionality} test image in {self.source}")


def showcase(run: str | Path = "runs/example", size: str = "small", root: str | Path | None = None,
             real: bool | None = None) -> Showcase:
    """The shipped MedMNIST model and the official test (and validation) splits found by
    :func:`official_medmnist_root`, or (none found, or ``real=False``) the example model trained in ``run``
    on the embedded data. ``real=True`` refuses to fall back."""
    found = official_medmnist_root(root) if real is not False else None
    if real and found is None:
        raise FileNotFoundError("no official MedMNIST file in root, $MEDMNIST_ROOT or ../shared/data/medmnist")
    if found is None:
        model, _ = load_model(example_run(run, size=size))
        return Showcase(model, EmbeddedDataset("val"), EmbeddedDataset("test"), "the example model on the embedded data",
                        real=False)
    model, _ = load_model(SHIPPED_MEDMNIST)
    flags = [flag for flag in model.tasks if medmnist_path(flag, 28, found).exists()]
    splits = {split: ConcatDataset([MedMNIST(flag, split, root=found, download=False) for flag in flags])
              for split in ("val", "test")}
    return Showcase(model, splits["val"], splits["test"],
                    f"{SHIPPED_MEDMNIST} on the official MedMNIST test splits in {found}", real=True)
