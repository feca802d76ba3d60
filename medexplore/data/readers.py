"""Readers for NIfTI (nibabel) and DICOM (pydicom) that keep spacing and orientation.

Every reader returns a :class:`Volume`: the array channels-first in (z, y, x) order (2D: (y, x)),
the spacing along those axes in mm, and the original affine. NIfTI images are reoriented to the
closest canonical (RAS+) orientation first; the file's own affine is kept in ``original_affine``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError

__all__ = ["Volume", "read_image", "read_nifti", "read_dicom", "is_nifti", "is_dicom_path", "DICOM_MODALITIES"]


@dataclass
class Volume:
    array: np.ndarray  # (C, *spatial) float32
    spacing: tuple[float, ...]  # per spatial axis, same order as the array
    affine: np.ndarray | None  # 4x4 voxel -> world of the canonical array (NIfTI), else None
    original_affine: np.ndarray | None
    source: str
    header: dict = field(default_factory=dict)  # the file's header fields as plain values
    modality: str | None = None  # medexplore's modality name, when the file says it
    body_part: str | None = None

    @property
    def dims(self) -> int:
        return self.array.ndim - 1


DICOM_MODALITIES = {"CT": "ct", "MR": "mri", "US": "ultrasound", "CR": "xray", "DX": "xray", "MG": "mammography",
                    "PT": "pet", "NM": "nuclear", "OP": "fundus", "XA": "xray", "SM": "pathology"}
DICOM_HEADER_FIELDS = ("Modality", "BodyPartExamined", "PatientID", "StudyDescription", "SeriesDescription",
                       "Manufacturer", "PixelSpacing", "SliceThickness", "ImageOrientationPatient",
                       "ImagePositionPatient", "RescaleSlope", "RescaleIntercept", "Rows", "Columns")


def _plain(value):
    """A header value as JSON-friendly Python (numbers, strings, lists)."""
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size > 1 else value.item()
    if isinstance(value, (bytes, bytearray)):
        return value.decode(errors="replace").strip("\x00 ")
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str)):
        return value
    return str(value)


def is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def is_dicom_path(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() in (".dcm", ".dicom", "")


def read_nifti(path: str | Path, label: bool = False) -> Volume:
    """A NIfTI file as (C, z, y, x) (3D) or (C, y, x) (2D); a 4th axis becomes channels."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such NIfTI file")
    try:
        img = nib.load(str(path))
        canonical = nib.as_closest_canonical(img)
        data = np.asarray(canonical.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many kinds for damaged files
        raise UserError(f"{path}: cannot read NIfTI (corrupt or truncated?): {exc}") from exc
    zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3])
    if data.ndim == 4:
        channels = np.moveaxis(data, -1, 0)
    elif data.ndim in (2, 3):
        channels = data[None]
    else:
        raise UserError(f"{path}: NIfTI with {data.ndim} dimensions {data.shape}; expected 2, 3 or 4")
    if channels.ndim == 4 and channels.shape[-1] == 1:  # a 2D image stored as (x, y, 1)
        channels, zooms = channels[..., 0], zooms[:2]
    # nibabel arrays are (x, y, z); medexplore uses (z, y, x)
    array = np.ascontiguousarray(channels.transpose(0, *range(channels.ndim - 1, 0, -1)))
    spacing = tuple(reversed(zooms[:channels.ndim - 1]))
    if label:
        array = np.rint(array)
    header = {k: _plain(v) for k, v in img.header.items()}
    return Volume(array.astype(np.float32), spacing, canonical.affine, img.affine, str(path), header)


def _dicom_pixels(ds, path: Path) -> np.ndarray:
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise UserError(f"{path}: DICOM without readable pixel data: {exc}") from exc
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    return pixels * slope + intercept


def _dicom_volume(pixels, spacing, ds, path: Path) -> Volume:
    header = {k: _plain(getattr(ds, k)) for k in DICOM_HEADER_FIELDS if hasattr(ds, k)}
    modality = DICOM_MODALITIES.get(str(getattr(ds, "Modality", "")).upper())
    body = str(getattr(ds, "BodyPartExamined", "") or "").strip().lower() or None
    return Volume(pixels, spacing, None, None, str(path), header, modality, body)


def read_dicom(path: str | Path) -> Volume:
    """A DICOM file (2D, or multi-frame 3D) or a series folder (3D, slices sorted along the normal)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such DICOM file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path}: empty DICOM series folder")
    slices = []
    for f in files:
        try:
            slices.append((f, pydicom.dcmread(str(f))))
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError) as exc:
            raise UserError(f"{f}: not a readable DICOM file (corrupt or truncated?): {exc}") from exc
    first = slices[0][1]
    row_col = tuple(float(v) for v in getattr(first, "PixelSpacing", (1.0, 1.0)))
    if len(slices) == 1:
        pixels = _dicom_pixels(first, files[0])
        if pixels.ndim == 2:
            return _dicom_volume(pixels[None], row_col, first, path)
        if pixels.ndim == 3 and getattr(first, "SamplesPerPixel", 1) == 3:
            return _dicom_volume(np.moveaxis(pixels, -1, 0), row_col, first, path)
        thickness = float(getattr(first, "SliceThickness", 1.0) or 1.0)
        return _dicom_volume(pixels[None], (thickness, *row_col), first, path)
    orientation = np.array(getattr(first, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])

    def position(ds):
        if hasattr(ds, "ImagePositionPatient"):
            return float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float)))
        return float(getattr(ds, "InstanceNumber", 0))

    slices.sort(key=lambda fd: position(fd[1]))
    arrays = [_dicom_pixels(ds, f) for f, ds in slices]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise UserError(f"{path}: series slices differ in shape {sorted(shapes)}")
    positions = [position(ds) for _, ds in slices]
    gaps = np.diff(positions)
    z = float(np.median(gaps)) if len(gaps) and np.median(gaps) > 0 else float(getattr(first, "SliceThickness", 1.0) or 1.0)
    return _dicom_volume(np.stack(arrays)[None], (z, *row_col), first, path)


def read_image(path: str | Path, label: bool = False) -> Volume:
    """NIfTI or DICOM by file name (a folder is a DICOM series)."""
    path = Path(path)
    if is_nifti(path):
        return read_nifti(path, label)
    if is_dicom_path(path):
        return read_dicom(path)
    raise UserError(f"{path}: unsupported image format; expected .nii, .nii.gz, .dcm or a DICOM series folder")
