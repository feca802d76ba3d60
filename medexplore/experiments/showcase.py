"""What the notebooks look at: the shipped MedMNIST model on the real MedMNIST test images when the official
files are on this machine, else the notebooks' example model on the embedded data.

Example:
    >>> show = showcase()                       # doctest: +SKIP
    >>> show.source, len(show.test)              # doctest: +SKIP
    ('medformer-medmnist-embedded-v5 on the official MedMNIST test splits in ../shared/data/medmnist', 1860)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset

from ..data.embedded import EmbeddedDataset
from ..data.medmnist import MEDMNIST, MedMNIST, medmnist_path
from ..data.sample import Sample
from ..data.sampling import MixedDataset
from ..models.medformer import Medformer
from ..pretrained import pretrained_models
from ..train.checkpoint import final_checkpoint, load_model
from ..train.workflow import model_section, run_training
from .demo import example_run

__all__ = ["SHIPPED_MEDMNIST", "SHIPPED_GENERAL", "Showcase", "ExplainCase", "official_medmnist_root", "showcase",
           "general_expert", "gmoe_run", "first_of_each_source"]

SHIPPED_MEDMNIST = "medformer-medmnist-embedded-v5"  # the five MedMNIST files and the embedded tasks
SHIPPED_GENERAL = "medformer-photos-vicreg-v2"  # its general expert: VICReg on photographs, same architecture
FINISHED = "finished"  # marks a run folder whose training ended (not stopped)
REPOSITORY_SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "medmnist"  # ../shared beside the checkout


def official_medmnist_root(root: str | Path | None = None) -> Path | None:
    """The first of ``root``, ``$MEDMNIST_ROOT`` and ``../shared/data/medmnist`` (beside the repository)
    holding a 28-px file of a task of the shipped MedMNIST model; None when none does."""
    flags = [task for task in pretrained_models()[SHIPPED_MEDMNIST].tasks if task in MEDMNIST]  # not the embedded tasks
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
    checkpoint: str = ""  # the model's checkpoint folder or shipped name
    train: Dataset | None = None  # its training images, each knowing its source (for train.balance=source)

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
        checkpoint = example_run(run, size=size)
        model, _ = load_model(checkpoint)
        return Showcase(model, EmbeddedDataset("val"), EmbeddedDataset("test"), "the example model on the embedded data",
                        real=False, checkpoint=str(checkpoint), train=EmbeddedDataset("train"))
    model, _ = load_model(SHIPPED_MEDMNIST)
    flags = [flag for flag in model.tasks if flag in MEDMNIST and medmnist_path(flag, 28, found).exists()]
    splits = {split: ConcatDataset([MedMNIST(flag, split, root=found, download=False) for flag in flags])
              for split in ("val", "test")}
    train = MixedDataset({flag: MedMNIST(flag, "train", root=found, download=False) for flag in flags})
    return Showcase(model, splits["val"], splits["test"],
                    f"{SHIPPED_MEDMNIST} on the official MedMNIST test splits in {found}", real=True,
                    checkpoint=SHIPPED_MEDMNIST, train=train)


def general_expert(out: str | Path, model: Medformer, steps: int = 1000, batch_size: int = 64, seed: int = 0) -> Path:
    """A general expert for ``model``'s GMoE-Adapter: its architecture pretrained with VICReg on crops of
    photographs (:class:`~medexplore.data.natural.NaturalImages`, never a medical image), trained in ``out``
    on first use and reused (an interrupted run is resumed). Returns the checkpoint folder.
    ``configs/general_expert.yaml`` made the shipped one (:data:`SHIPPED_GENERAL`) for the shipped model."""
    out = Path(out)
    epochs = max(1, steps // 125)
    config = {"model": model_section(model.config),
              "data": {"datasets": ["natural"], "size": 28, "seed": seed},
              "train": {"epochs": epochs, "steps_per_epoch": max(1, steps // epochs), "batch_size": batch_size,
                        "lr": 1e-3, "expander": [512, 512], "seed": seed}}
    if not (out / FINISHED).exists():
        if not run_training(config, out, mode="vicreg", resume=True).result.stopped:
            (out / FINISHED).write_text("")
    return final_checkpoint(out)


def first_of_each_source(dataset: Dataset, per_source: int) -> Dataset:
    """The first ``per_source`` samples of every part of a ConcatDataset; of any other dataset, ``4 * per_source``
    samples evenly spread over it (the embedded data lists its 2D images before its volumes)."""
    if not isinstance(dataset, ConcatDataset):
        count = min(per_source * 4, len(dataset))
        return Subset(dataset, np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist())
    starts = [0] + list(dataset.cumulative_sizes[:-1])
    return Subset(dataset, [s + i for s, part in zip(starts, dataset.datasets) for i in range(min(per_source, len(part)))])


def gmoe_run(show: Showcase, general: str | Path, out: str | Path, steps: int = 60, batch_size: int = 32,
             per_source: int = 48, seed: int = 0) -> Medformer:
    """``show``'s model adapted with a GMoE-Adapter that mixes it (expert ``medical``) with ``general``: the
    gates, adapters and heads learn for ``steps`` steps on ``show.train`` (every source equally likely),
    the experts stay frozen; validation and test read the first ``per_source`` images of each source.
    Trained in ``out`` on first use and reused. Returns the adapted model (its gates: ``gate_weights``)."""
    out = Path(out)
    if not (out / "test_metrics.json").exists():
        config = {"model": model_section(show.model.config),
                  "data": {"source": show.source},
                  "train": {"epochs": 1, "steps_per_epoch": steps, "batch_size": batch_size, "lr": 1e-3,
                            "balance": "source", "monitor": "auc", "seed": seed},
                  "adapt": {"strategy": "gmoe", "general": str(general)}}
        medical, _ = load_model(show.checkpoint)
        datasets = {"train": show.train, "val": first_of_each_source(show.val, per_source),
                    "test": first_of_each_source(show.test, per_source)}
        run_training(config, out, init=show.checkpoint, resume=True, datasets=datasets, model=medical)
    return load_model(final_checkpoint(out))[0]
