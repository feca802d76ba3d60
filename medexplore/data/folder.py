"""Your own images: a folder of NIfTI / DICOM files with a CSV of per-image labels.

CSV columns (one row per image):
    image        path of a .nii/.nii.gz file, a .dcm file or a DICOM series folder (relative to the CSV)
    patient_id   optional; modality, body_part optional (default ``unknown``); split optional
    <task>       one column per task, an empty cell meaning "not annotated":
                 binary / multiclass / ordinal: an integer; regression: numbers separated by ``;``;
                 multilabel: 0/1 values separated by ``;``; segmentation: path of a NIfTI mask;
                 detection: a JSON list of boxes ``[[lo..., hi...], ...]`` or the path of a .json file.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..models.tasks import Domain, TaskKind, TaskSpec
from .readers import is_nifti, read_image
from .sample import Sample, check_image
from .transforms import fit_to_multiple, normalize_intensity

__all__ = ["FolderDataset"]


class FolderDataset(Dataset):
    """Images listed in a CSV, read lazily, normalised per modality and padded to ``multiple``.

    Args:
        csv_path: the label table.
        tasks: the task columns to read (others are ignored).
        split: keep only rows whose ``split`` column equals this (None: all rows).
        multiple: pad each image (and mask) at the far end to a multiple of this (the patch size).

    Spacing and orientation are kept: ``sample.spacing`` (mm, array axis order) and
    ``sample.meta["affine"]`` / ``["original_affine"]`` for NIfTI.
    """

    def __init__(self, csv_path: str | Path, tasks: Sequence[TaskSpec], split: str | None = None, multiple: int = 16):
        self.csv_path = Path(csv_path)
        if not self.csv_path.exists():
            raise FileNotFoundError(f"{self.csv_path}: label table not found")
        self.tasks, self.multiple = list(tasks), multiple
        with open(self.csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            rows = list(reader)
        for line, row in enumerate(rows, start=2):  # the header is line 1
            row["_line"] = line
        if "image" not in columns:
            raise UserError(f"{self.csv_path}: missing column 'image' (found {columns})")
        missing = [t.name for t in self.tasks if t.name not in columns]
        if missing:
            raise UserError(f"{self.csv_path}: missing task column(s) {missing}")
        if split is not None:
            if "split" not in columns:
                raise UserError(f"{self.csv_path}: split={split!r} asked but the table has no 'split' column")
            rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise UserError(f"{self.csv_path}: no rows{'' if split is None else f' for split {split!r}'}")
        self.rows = rows
        self.labels = [self._parse_labels(r) for r in rows]
        self.domains = list(dict.fromkeys(self._domain(r) for r in rows))

    def _domain(self, row: dict, dims: int | None = None) -> Domain:
        dims = dims or (3 if row.get("dimensionality", "3d") == "3d" else 2)
        return Domain(f"{dims}d", row.get("modality") or "unknown", row.get("body_part") or "unknown")

    def _parse_labels(self, row: dict) -> dict:
        labels = {}
        where = f"{self.csv_path}, row {row['_line']}"
        for task in self.tasks:
            cell = (row.get(task.name) or "").strip()
            if not cell:
                continue
            try:
                if task.kind in (TaskKind.BINARY, TaskKind.MULTICLASS, TaskKind.ORDINAL):
                    labels[task.name] = int(cell)
                elif task.kind in (TaskKind.REGRESSION, TaskKind.MULTILABEL):
                    values = [float(v) for v in cell.split(";")]
                    if len(values) != task.num_outputs:
                        raise UserError(f"{len(values)} values for {task.num_outputs} outputs")
                    labels[task.name] = torch.tensor(values)
                elif task.kind == TaskKind.SEGMENTATION:
                    labels[task.name] = self.csv_path.parent / cell
                else:
                    text = (self.csv_path.parent / cell).read_text() if cell.endswith(".json") else cell
                    boxes = json.loads(text)
                    labels[task.name] = torch.tensor(boxes, dtype=torch.float32).reshape(len(boxes), -1)
            except (ValueError, json.JSONDecodeError, OSError) as exc:
                raise UserError(f"{where}, column {task.name!r}: cannot parse {cell!r}: {exc}") from exc
        return labels

    def __len__(self) -> int:
        return len(self.rows)

    def check(self) -> None:
        """Open every image's header (and its masks') now, so a bad row fails before training, not after.

        Raises a ValueError naming the table row and the file: missing files, unreadable headers,
        masks whose shape differs from their image's.
        """
        for i, row in enumerate(self.rows):
            where = f"{self.csv_path}, row {row['_line']}"
            shape = _header_shape(self.csv_path.parent / row["image"], where)
            for name, value in self.labels[i].items():
                if isinstance(value, Path):
                    mask_shape = _header_shape(value, where)
                    if shape is not None and mask_shape is not None and mask_shape != shape:
                        raise UserError(f"{where}: mask {value} has shape {mask_shape}, its image "
                                         f"{row['image']} has {shape}")

    def labels_of(self, i: int) -> dict:
        return self.labels[i]

    def __getitem__(self, i: int) -> Sample:
        row = self.rows[i]
        path = self.csv_path.parent / row["image"]
        volume = read_image(path)
        domain = self._domain(row, volume.dims)
        raw = torch.from_numpy(volume.array)
        check_image(raw, str(path), domain)  # before normalisation, which would spread a NaN everywhere
        image = normalize_intensity(raw, domain.modality)
        spatial = tuple(image.shape[1:])
        image = fit_to_multiple(image, self.multiple, "pad")
        labels = {}
        for name, value in self.labels[i].items():
            if isinstance(value, Path):
                mask = read_image(value, label=True).array[0]
                if mask.shape != spatial:
                    raise UserError(f"{value}: mask shape {mask.shape} differs from image {path} shape {spatial}")
                value = fit_to_multiple(torch.from_numpy(mask).long()[None], self.multiple, "pad")[0]
            labels[name] = value
        return Sample(image, domain, labels, volume.spacing, row.get("patient_id") or None,
                      meta={"source": str(path), "index": i, "affine": volume.affine,
                            "original_affine": volume.original_affine})


def _header_shape(path: Path, where: str) -> tuple[int, ...] | None:
    """The stored array shape from a NIfTI header, after checking a DICOM header; None for DICOM folders."""
    if not path.exists():
        raise FileNotFoundError(f"{where}: {path} does not exist")
    try:
        if is_nifti(path):
            import nibabel as nib

            return tuple(int(n) for n in nib.load(str(path)).shape)
        if path.is_file():
            from pydicom import dcmread

            dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # nibabel and pydicom raise many kinds for damaged headers
        raise UserError(f"{where}: {path}: unreadable header (corrupt or truncated?): {exc}") from exc
    return None
