"""MedMNIST v2: one declarative table of the 18 datasets, and a reader of their npz files."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ..models.tasks import Domain, TaskSpec
from .cache import memory_mapped_arrays
from .sample import Sample

__all__ = ["MedMNISTInfo", "MEDMNIST", "MedMNIST", "medmnist_path", "load_medmnist_npz", "default_root"]

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MedMNISTInfo:
    """One row of the table: everything that drives datasets, task specs, metrics and the CLI."""

    flag: str
    kind: str  # a TaskKind value
    labels: tuple[str, ...]
    channels: int
    modality: str
    body_part: str
    dims: int
    counts: tuple[int, int, int]  # official train / val / test sizes (original v2 release)
    licence: str = "CC BY 4.0"
    current_counts: tuple[int, int, int] | None = None  # sizes in the current release, where they changed

    @property
    def count_sets(self) -> tuple[tuple[int, int, int], ...]:
        """Every official (train, val, test) size set: the v2 paper's and, where it differs, the current release's."""
        return (self.counts,) if self.current_counts is None else (self.counts, self.current_counts)

    @property
    def sizes(self) -> tuple[int, ...]:
        return (28, 64, 128, 224) if self.dims == 2 else (28, 64)

    @property
    def domain(self) -> Domain:
        return Domain(f"{self.dims}d", self.modality, self.body_part)

    def task(self, name: str | None = None) -> TaskSpec:
        """The TaskSpec of this dataset's label (binary tasks use one logit)."""
        n = 1 if self.kind == "binary" else len(self.labels)
        return TaskSpec(name or self.flag, self.kind, n, dimensionalities=(f"{self.dims}d",),
                        label_names=self.labels if self.kind != "binary" else ())


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
           "lung-left", "lung-right", "pancreas", "spleen")
_TISSUE = ("collecting duct, connecting tubule", "distal convoluted tubule", "glomerular endothelial cells",
           "interstitial endothelial cells", "leukocytes", "podocytes", "proximal tubule segments",
           "thick ascending limb")

MEDMNIST: dict[str, MedMNISTInfo] = {info.flag: info for info in [
    MedMNISTInfo("pathmnist", "multiclass", ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                 "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
                 3, "pathology", "colon", 2, (89996, 10004, 7180)),
    MedMNISTInfo("chestmnist", "multilabel", ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass",
                 "nodule", "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                 "pleural", "hernia"), 1, "xray", "chest", 2, (78468, 11219, 22433)),
    MedMNISTInfo("dermamnist", "multiclass", ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                 "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions"),
                 3, "dermatoscopy", "skin", 2, (7007, 1003, 2005), "CC BY-NC 4.0"),
    MedMNISTInfo("octmnist", "multiclass", ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
                 1, "oct", "retina", 2, (97477, 10832, 1000)),
    MedMNISTInfo("pneumoniamnist", "binary", ("normal", "pneumonia"), 1, "xray", "chest", 2, (4708, 524, 624)),
    MedMNISTInfo("retinamnist", "ordinal", ("0", "1", "2", "3", "4"), 3, "fundus", "retina", 2, (1080, 120, 400)),
    MedMNISTInfo("breastmnist", "binary", ("malignant", "normal, benign"), 1, "ultrasound", "breast", 2, (546, 78, 156)),
    MedMNISTInfo("bloodmnist", "multiclass", ("basophil", "eosinophil", "erythroblast", "immature granulocytes",
                 "lymphocyte", "monocyte", "neutrophil", "platelet"), 3, "microscopy", "blood", 2, (11959, 1712, 3421)),
    MedMNISTInfo("tissuemnist", "multiclass", _TISSUE, 1, "microscopy", "kidney", 2, (165466, 23640, 47280)),
    MedMNISTInfo("organamnist", "multiclass", _ORGANS, 1, "ct", "abdomen", 2, (34581, 6491, 17778),
                 current_counts=(34561, 6491, 17778)),
    MedMNISTInfo("organcmnist", "multiclass", _ORGANS, 1, "ct", "abdomen", 2, (13000, 2392, 8268),
                 current_counts=(12975, 2392, 8216)),
    MedMNISTInfo("organsmnist", "multiclass", _ORGANS, 1, "ct", "abdomen", 2, (13940, 2452, 8829),
                 current_counts=(13932, 2452, 8827)),
    MedMNISTInfo("organmnist3d", "multiclass", _ORGANS, 1, "ct", "abdomen", 3, (972, 161, 610),
                 current_counts=(971, 161, 610)),
    MedMNISTInfo("nodulemnist3d", "binary", ("benign", "malignant"), 1, "ct", "chest", 3, (1158, 165, 310)),
    MedMNISTInfo("adrenalmnist3d", "binary", ("normal", "hyperplasia"), 1, "ct", "adrenal", 3, (1188, 98, 298)),
    MedMNISTInfo("fracturemnist3d", "multiclass", ("buckle rib fracture", "nondisplaced rib fracture",
                 "displaced rib fracture"), 1, "ct", "chest", 3, (1027, 103, 240)),
    MedMNISTInfo("vesselmnist3d", "binary", ("vessel", "aneurysm"), 1, "mra", "brain", 3, (1335, 192, 382),
                 current_counts=(1335, 191, 382)),
    MedMNISTInfo("synapsemnist3d", "binary", ("inhibitory synapse", "excitatory synapse"), 1, "microscopy", "brain", 3,
                 (1230, 177, 352)),
]}


def default_root() -> Path:
    return Path(os.environ.get("MEDMNIST_ROOT", Path.home() / ".medmnist"))


def _info(flag: str) -> MedMNISTInfo:
    if flag not in MEDMNIST:
        raise UserError(f"unknown MedMNIST dataset {flag!r}; available: {sorted(MEDMNIST)}")
    return MEDMNIST[flag]


def medmnist_path(flag: str, size: int = 28, root: str | Path | None = None) -> Path:
    """Where the medmnist package keeps ``flag`` at ``size``: ``{root}/{flag}[_{size}].npz``."""
    info = _info(flag)
    if size not in info.sizes:
        raise UserError(f"{flag} is published at sizes {info.sizes}, not {size}")
    root = Path(root) if root is not None else default_root()
    return root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")


def _download(flag: str, size: int, root: Path) -> None:
    """Fetch through the medmnist package; raises FileNotFoundError saying what to put where."""
    target = medmnist_path(flag, size, root)
    try:
        import medmnist

        cls = getattr(medmnist, medmnist.INFO[flag]["python_class"])
    except (ImportError, KeyError, AttributeError):
        cls = None
    if cls is not None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            cls(split="test", download=True, root=str(root), size=size)
            if target.exists():
                return
        except Exception as exc:  # offline, or the registry moved
            log.warning("medmnist download of %s failed: %s", flag, exc)
    raise FileNotFoundError(
        f"MedMNIST file {target} not found and could not be downloaded. Put the medmnist npz file "
        f"'{target.name}' (arrays train_images, train_labels, val_images, ...) at {target}, or pass --root / "
        f"set MEDMNIST_ROOT to the folder that holds it.")


def load_medmnist_npz(path: str | Path, info: MedMNISTInfo, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one split, validated; errors name the file and the array.

    The images are a read-only memory map of the split's cached ``.npy`` (:mod:`medexplore.data.cache`):
    files larger than memory work, and only the samples read come into memory.
    """
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(path)
    arrays = memory_mapped_arrays(path, [f"{split}_images", f"{split}_labels"])
    images, labels = arrays[f"{split}_images"], np.asarray(arrays[f"{split}_labels"])
    spatial = images.ndim - 1 - (1 if info.dims == 2 and info.channels == 3 else 0)
    if spatial != info.dims:
        raise UserError(f"{path}: {split}_images has shape {images.shape}; {info.flag} expects "
                         f"{info.dims}D images{' with 3 channels last' if info.channels == 3 else ''}")
    if len(images) == 0:
        raise UserError(f"{path}: {split}_images is empty")
    if np.issubdtype(images.dtype, np.floating):
        bad = _non_finite_rows(images)
        if len(bad):
            raise UserError(f"{path}: {split}_images has NaN/Inf pixels in {len(bad)} image(s), indices "
                             f"{bad[:10].tolist()}{' ...' if len(bad) > 10 else ''}")
    if labels.shape[0] != images.shape[0]:
        raise UserError(f"{path}: {split}_labels has {labels.shape[0]} rows for {images.shape[0]} images")
    width = len(info.labels) if info.kind == "multilabel" else 1
    if labels.reshape(len(labels), -1).shape[1] != width:
        raise UserError(f"{path}: {split}_labels has shape {labels.shape}; expected ({len(labels)}, {width})")
    if info.kind != "multilabel" and (labels.min() < 0 or labels.max() >= len(info.labels)):
        raise UserError(f"{path}: {split}_labels values {labels.min()}..{labels.max()} outside 0..{len(info.labels) - 1}")
    return images, labels.reshape(len(labels), -1)


def _non_finite_rows(images: np.ndarray, chunk_bytes: int = 1 << 26) -> np.ndarray:
    """Indices of images holding NaN or Inf, read a chunk of rows at a time (memory stays bounded)."""
    rows = max(1, chunk_bytes // max(1, images[0].nbytes))
    bad = []
    for start in range(0, len(images), rows):
        block = np.asarray(images[start:start + rows])
        bad.append(start + np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(1)))
    return np.concatenate(bad)


class MedMNIST(torch.utils.data.Dataset):
    """One split of one MedMNIST dataset as :class:`Sample` objects.

    Args:
        flag: dataset name, e.g. ``"pneumoniamnist"``.
        split: ``train``, ``val`` or ``test``.
        size: 28/64/128/224 (2D) or 28/64 (3D).
        root: folder with the medmnist npz files (default ``~/.medmnist`` or ``$MEDMNIST_ROOT``).
        path: an explicit npz file (overrides ``root``/``size``); split sizes may differ from the official ones.
        download: fetch with the ``medmnist`` package when the file is missing.
        task_name: label key of the samples (default: ``flag``).

    Images become float ``(C, *spatial)`` in [-1, 1] as they are read; the split stays on disk, memory
    mapped (:func:`load_medmnist_npz`), so its size is not bounded by memory.
    """

    def __init__(self, flag: str, split: str = "train", size: int = 28, root=None, path=None,
                 download: bool = True, task_name: str | None = None):
        self.info = _info(flag)
        self.split = split
        self.task_name = task_name or flag
        if path is None:
            path = medmnist_path(flag, size, root)
            if not path.exists():
                if not download:
                    raise FileNotFoundError(f"MedMNIST file {path} not found; put '{path.name}' there or enable download")
                _download(flag, size, path.parent)
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"MedMNIST file {self.path} not found")
        self.raw_images, labels = load_medmnist_npz(self.path, self.info, split)
        official = sorted({counts[SPLITS.index(split)] for counts in self.info.count_sets})
        if len(self.raw_images) not in official:
            log.warning("%s %s split has %d images (official: %s)", self.path, split, len(self.raw_images),
                        " or ".join(map(str, official)))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.domain = self.info.domain

    def image(self, index) -> Tensor:
        """Image(s) ``index`` (an int or a slice) as float ``(C, *spatial)`` in [-1, 1] (a batch for a slice)."""
        x = torch.from_numpy(np.array(self.raw_images[index]))
        one = isinstance(index, (int, np.integer))
        if self.info.dims == 2 and self.info.channels == 3:
            x = x.movedim(-1, 0 if one else 1)
        else:
            x = x.unsqueeze(0 if one else 1)
        return (x.float() / 127.5 - 1.0).contiguous()

    @property
    def images(self) -> Tensor:
        """The whole split as one float tensor (in memory: for small files)."""
        return self.image(slice(None))

    def __len__(self) -> int:
        return len(self.raw_images)

    def label(self, i: int):
        y = self.labels[i]
        return y.float() if self.info.kind == "multilabel" else int(y[0])

    def labels_of(self, i: int) -> dict:
        return {self.task_name: self.label(i)}

    def __getitem__(self, i: int) -> Sample:
        return Sample(self.image(int(i)), self.domain, self.labels_of(i),
                      patient_id=None, meta={"source": f"{self.info.flag}:{self.split}", "index": i})

    @property
    def task(self) -> TaskSpec:
        return self.info.task(self.task_name)

    @property
    def tasks(self) -> list[TaskSpec]:
        return [self.task]

    @property
    def domains(self) -> list[Domain]:
        return [self.domain]
