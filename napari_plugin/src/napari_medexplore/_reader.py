"""napari reader: NIfTI and DICOM through ``medexplore.data.readers``, MedMNIST npz splits as stacks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medexplore.data.medmnist import MEDMNIST, SPLITS, load_medmnist_npz
from medexplore.data.readers import Volume, is_nifti, read_image
from medexplore.errors import UserError
from medexplore.models.tasks import Domain

from ._layers import domain_metadata


def get_reader(path):
    """The reader for ``path`` (one file or a DICOM folder), or None when it is not ours."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    path = Path(path)
    if path.suffix == ".npz":
        return read_npz
    if is_nifti(path):
        return read_volume
    if path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir()):
        return read_volume
    if path.suffix.lower() in (".dcm", ".dicom"):
        return read_volume
    return None


def volume_layer(volume: Volume, name: str | None = None) -> tuple:
    """One Image layer tuple: scale from the spacing, affine and header in the metadata."""
    dims = volume.dims
    domain = Domain(f"{dims}d", volume.modality or "unknown", volume.body_part or "unknown")
    metadata = {"source": volume.source, "spacing": tuple(volume.spacing), "header": volume.header,
                "affine": volume.affine, "original_affine": volume.original_affine, **domain_metadata(domain)}
    kwargs = {"name": name or Path(volume.source).name.split(".")[0], "scale": tuple(volume.spacing),
              "metadata": metadata}
    if volume.affine is not None:  # NIfTI: place the canonical (RAS) array at its world origin, axes (z, y, x)
        kwargs["translate"] = tuple(float(t) for t in volume.affine[:3, 3][::-1][-dims:])
    channels = volume.array.shape[0]
    if channels == 1:
        return volume.array[0], kwargs, "image"
    if dims == 2 and channels == 3:
        return np.moveaxis(volume.array, 0, -1), {**kwargs, "rgb": True}, "image"
    return volume.array, {**kwargs, "channel_axis": 0}, "image"


def read_volume(path) -> list[tuple]:
    path = path[0] if isinstance(path, list) else path
    return [volume_layer(read_image(path))]


def _medmnist_info(path: Path):
    stem = path.stem.split("_")[0].lower()
    return MEDMNIST.get(stem)


def read_npz(path) -> list[tuple]:
    """Every split of a MedMNIST npz as one stack layer; labels per image in ``metadata['features']``.

    (Image layers have no ``features`` in napari; Labels and Shapes layers do.) Only the first split
    is visible.
    """
    path = Path(path[0] if isinstance(path, list) else path)
    info = _medmnist_info(path)
    if info is None:
        raise UserError(f"{path}: not a MedMNIST file name (expected e.g. pneumoniamnist.npz or "
                         f"organmnist3d_64.npz; known: {', '.join(sorted(MEDMNIST))})")
    with np.load(path, allow_pickle=False) as data:
        present = [s for s in SPLITS if f"{s}_images" in data.files]
    if not present:
        raise UserError(f"{path}: no <split>_images arrays; expected train/val/test_images and _labels")
    layers = []
    for k, split in enumerate(present):
        images, labels = load_medmnist_npz(path, info, split)
        features = pd.DataFrame({"index": np.arange(len(images))})
        for j in range(labels.shape[1]):
            column = "label" if labels.shape[1] == 1 else f"label:{info.labels[j] if j < len(info.labels) else j}"
            features[column] = labels[:, j]
        if labels.shape[1] == 1:
            names = dict(enumerate(info.labels))
            features["label_name"] = [names.get(int(v), str(v)) for v in labels[:, 0]]
        rgb = info.dims == 2 and info.channels == 3
        meta = {"source": str(path), "split": split, "features": features, "medmnist": info.flag,
                **domain_metadata(info.domain)}
        layers.append((images, {"name": f"{info.flag} {split}", "rgb": rgb, "metadata": meta, "visible": k == 0},
                       "image"))
    return layers
