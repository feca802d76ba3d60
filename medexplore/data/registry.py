"""Datasets by name: one data-config dict describes what to load (used by the CLI, napari, notebooks)."""
from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from ..errors import UserError
from ..models.config import DomainVocab
from ..models.tasks import Domain, TaskSpec
from ..typed import coerce_fields
from .annotations import NothingFoundView, keep_tasks, load_pseudo_labels, select_annotations
from .embedded import EmbeddedConfig, EmbeddedDataset
from .folder import FolderDataset
from .medmnist import MEDMNIST, MedMNIST
from .natural import NaturalImages
from .sampling import MixedDataset

__all__ = ["DataSection", "check_data_config", "build_dataset", "dataset_parts", "dataset_tasks", "dataset_domains",
           "vocab_for", "available_datasets"]


@dataclass(frozen=True)
class DataSection:
    """The keys a config's ``data`` section may hold, with their types."""

    datasets: tuple[str, ...] = ()
    size: int = 28
    root: str | None = None
    path: str | None = None
    seed: int = 0
    csv: str | None = None
    tasks: list | None = None
    multiple: int = 16
    annotations: str = "full"
    label_fraction: float = 1.0
    subset_seed: int = 0
    pseudo_labels: str | None = None
    keep_tasks: list | None = None
    nothing_found: list | None = None
    volume_size: int | None = None
    embedded: dict | None = None


def check_data_config(data: dict) -> dict:
    """``data`` with every value converted to its type; unknown keys raise, naming them."""
    return coerce_fields(DataSection, dict(data), "data")


def available_datasets() -> list[str]:
    return ["embedded", "folder", "natural", *MEDMNIST]


def embedded_config(data: dict) -> EmbeddedConfig:
    """The embedded dataset's configuration: ``data.embedded`` (EmbeddedConfig fields), ``data.seed`` and
    ``data.volume_size`` (the side of its 3D crops)."""
    options = dict(data.get("embedded") or {})
    if data.get("volume_size"):
        options.setdefault("size_3d", data["volume_size"])
    options.setdefault("seed", data.get("seed", 0))
    return EmbeddedConfig(**coerce_fields(EmbeddedConfig, options, "data.embedded"))


def _one(name: str, data: dict, split: str) -> Dataset:
    if name == "embedded":
        return EmbeddedDataset(split, embedded_config(data))
    if name == "folder":
        if not data.get("csv") or not data.get("tasks"):
            raise UserError("the 'folder' dataset needs data.csv (the label table) and data.tasks (task specs)")
        tasks = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in data["tasks"]]
        return FolderDataset(data["csv"], tasks, split=split, multiple=int(data.get("multiple", 16)))
    if name == "natural":  # unlabelled photographs for pretraining a general expert
        return NaturalImages({"train": 4096, "val": 256, "test": 256}[split], int(data.get("size", 28)),
                             seed=int(data.get("seed", 0)) + ("train", "val", "test").index(split))
    if name in MEDMNIST:
        return MedMNIST(name, split, size=int(data.get("size", 28)), root=data.get("root"), path=data.get("path"))
    raise UserError(f"unknown dataset {name!r}; available: {available_datasets()}")


def build_dataset(data: dict, split: str) -> Dataset:
    """The dataset a data section describes: ``{"datasets": [...], "size": 28, "root": ..., "path": ...}``.

    ``embedded`` is the built-in data; ``natural`` unlabelled crops of scikit-image's photographs
    (for a general expert's VICReg pretraining); ``folder`` reads ``data.csv`` with ``data.tasks`` (a list of
    TaskSpec dicts), the CSV's ``split`` column selecting train/val/test; other names are MedMNIST flags.

    Several names give a :class:`MixedDataset` (sample weights per source come from the trainer).
    On the training split, each dataset keeps the images and annotations that ``annotations``,
    ``label_fraction`` (drawn with ``subset_seed``) and ``pseudo_labels`` select
    (:func:`~medexplore.data.annotations.select_annotations`). ``keep_tasks`` keeps only those tasks'
    annotations in every split (datasets carrying none of them are left out): a single-task model.
    ``nothing_found`` names tasks whose findings the other datasets' images are known not to show (synthetic
    lesions on real images): on the training and validation splits (the test split stays as published), every
    image of a dataset carrying none of them is labelled "nothing found" for them (``NothingFoundView``).
    """
    data = check_data_config(data)
    names = list(data.get("datasets") or [])
    if not names:
        raise UserError("data.datasets is empty: name at least one dataset")
    if data.get("path") and len(names) != 1:
        raise UserError("data.path names one npz file; give exactly one dataset with it")
    pseudo = load_pseudo_labels(data["pseudo_labels"]) if data.get("pseudo_labels") else {}
    unknown = sorted(set(pseudo) - set(names))
    if unknown:
        raise UserError(f"data.pseudo_labels {data['pseudo_labels']}: labels for dataset(s) {unknown} "
                         f"not among data.datasets {names}")
    sets = {name: _one(name, data, split) for name in names}
    if data.get("keep_tasks"):
        known = {t.name for d in sets.values() for t in getattr(d, "tasks", ())}
        unknown = sorted(set(data["keep_tasks"]) - known)
        if unknown:
            raise UserError(f"data.keep_tasks: no dataset among {names} has task(s) {unknown}; tasks: {sorted(known)}")
        kept = {name: keep_tasks(d, data["keep_tasks"]) for name, d in sets.items()}
        sets = {name: d for name, d in kept.items() if d is not None}
        if not sets:
            raise UserError(f"data.keep_tasks {list(data['keep_tasks'])}: no dataset among {names} carries these tasks")
    if data.get("nothing_found") and split != "test":
        sets = _nothing_found(sets, list(data["nothing_found"]))
    if split == "train":
        sets = {name: select_annotations(d, data.get("annotations", "full"), float(data.get("label_fraction", 1.0)),
                                         int(data.get("subset_seed", 0)), pseudo.get(name))
                for name, d in sets.items()}
    return next(iter(sets.values())) if len(sets) == 1 else MixedDataset(sets)


def _nothing_found(sets: dict[str, Dataset], names: list[str]) -> dict[str, Dataset]:
    """Each dataset carrying none of the tasks ``names`` labelled as showing none of their findings."""
    specs = {t.name: t for d in sets.values() for t in getattr(d, "tasks", ()) if t.name in names}
    unknown = sorted(set(names) - set(specs))
    if unknown:
        raise UserError(f"data.nothing_found: no dataset among {list(sets)} has task(s) {unknown}")
    return {name: d if any(t.name in specs for t in getattr(d, "tasks", ())) else
            NothingFoundView(d, [specs[n] for n in names]) for name, d in sets.items()}


def dataset_parts(dataset: Dataset) -> list[Dataset]:
    """The datasets a mixture is made of (or the dataset itself)."""
    return list(dataset.datasets.values()) if isinstance(dataset, MixedDataset) else [dataset]


def dataset_tasks(dataset: Dataset) -> list[TaskSpec]:
    """Every task the dataset (or each part of a mixture) is labelled for, each name once."""
    tasks: dict[str, TaskSpec] = {}
    for part in dataset_parts(dataset):
        for task in getattr(part, "tasks", ()):
            tasks.setdefault(task.name, task)
    return list(tasks.values())


def dataset_domains(dataset: Dataset) -> list[Domain]:
    return list(dict.fromkeys(d for part in dataset_parts(dataset) for d in getattr(part, "domains", ())))


def vocab_for(dataset: Dataset) -> DomainVocab:
    domains = dataset_domains(dataset)
    return DomainVocab(tuple(dict.fromkeys(d.modality for d in domains)),
                       tuple(dict.fromkeys(d.body_part for d in domains)))
