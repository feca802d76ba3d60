"""NIfTI / DICOM readers and the CSV folder dataset, including damaged files."""
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medexplore.data.folder import FolderDataset
from medexplore.data.readers import read_dicom, read_image, read_nifti
from medexplore.models import TaskSpec


def write_nifti(path, array, zooms=(2.0, 2.0, 3.0)):
    affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(path))
    return path


def write_series(folder, n=3, gap=2.5):
    folder.mkdir()
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k in range(n):
        ds = base.copy()
        ds.ImagePositionPatient = [0.0, 0.0, float(k * gap)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = n - k  # stored out of order on purpose
        arr = np.full((128, 128), 1024 + 100 * k, dtype=np.int16)
        ds.PixelData = arr.tobytes()
        ds.save_as(str(folder / f"slice{n - k}.dcm"))
    return folder


def test_nifti_keeps_spacing_and_reorients(tmp_path):
    data = np.zeros((4, 6, 8))
    data[1, 2, 3] = 5.0  # x=1, y=2, z=3
    vol = read_nifti(write_nifti(tmp_path / "a.nii.gz", data))
    assert vol.array.shape == (1, 8, 6, 4) and vol.spacing == (3.0, 2.0, 2.0)
    assert vol.array[0, 3, 2, 1] == 5.0
    # a left-right flipped affine is reoriented to RAS: the voxel moves, the original affine is kept
    flipped = tmp_path / "f.nii"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([-2.0, 2.0, 3.0, 1.0])), str(flipped))
    v2 = read_nifti(flipped)
    assert v2.array[0, 3, 2, 4 - 1 - 1] == 5.0 and v2.original_affine[0, 0] == -2.0 and v2.affine[0, 0] == 2.0
    two_d = read_nifti(write_nifti(tmp_path / "b.nii", np.ones((5, 7, 1))))
    assert two_d.array.shape == (1, 7, 5) and two_d.dims == 2


def test_dicom_single_file_and_series(tmp_path):
    single = read_dicom(get_testdata_file("CT_small.dcm"))
    assert single.array.shape == (1, 128, 128) and single.spacing == pytest.approx((0.661468, 0.661468))
    assert single.array.min() < -500  # rescale intercept applied: Hounsfield units
    series = read_image(write_series(tmp_path / "series"))
    assert series.array.shape == (1, 3, 128, 128) and series.spacing[0] == pytest.approx(2.5)
    assert list(series.array[0, :, 0, 0]) == [0.0, 100.0, 200.0]  # sorted by position, HU = raw - 1024


def test_damaged_files_are_named(tmp_path):
    good = write_nifti(tmp_path / "g.nii.gz", np.ones((4, 4, 4)))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="bad.nii.gz: cannot read NIfTI"):
        read_nifti(bad)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" + b"\x00" * 10)
    with pytest.raises(ValueError, match="broken.dcm: not a readable DICOM file"):
        read_dicom(broken)
    with pytest.raises(ValueError, match="unsupported image format"):
        read_image(tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="no such NIfTI file"):
        read_nifti(tmp_path / "none.nii")


def make_folder(tmp_path, mask_shape=(16, 16, 16), nan=False):
    img = np.random.default_rng(0).random((16, 16, 16))
    if nan:
        img[0, 0, 0] = np.nan
    write_nifti(tmp_path / "brain.nii.gz", img, zooms=(1.0, 1.0, 1.0))
    write_nifti(tmp_path / "brain_mask.nii.gz", (np.arange(np.prod(mask_shape)).reshape(mask_shape) % 3), (1.0, 1.0, 1.0))
    write_series(tmp_path / "ct_series", n=4)
    (tmp_path / "boxes.json").write_text(json.dumps([[1, 2, 3, 5, 6, 7]]))
    (tmp_path / "labels.csv").write_text(
        "image,patient_id,modality,body_part,split,grade,volume,tissue,lesions\n"
        "brain.nii.gz,p1,mri,brain,train,2,1.5,brain_mask.nii.gz,boxes.json\n"
        "ct_series,p2,ct,chest,train,,,,\"[[0, 0, 0, 2, 16, 16]]\"\n"
        "brain.nii.gz,p3,mri,brain,test,1,,,\n")
    tasks = [TaskSpec("grade", "ordinal", 3), TaskSpec("volume", "regression", 1),
             TaskSpec("tissue", "segmentation", 3), TaskSpec("lesions", "detection", 2)]
    return tmp_path / "labels.csv", tasks


def test_folder_dataset_reads_labels_masks_boxes(tmp_path):
    csv_path, tasks = make_folder(tmp_path)
    ds = FolderDataset(csv_path, tasks, split="train", multiple=16)
    assert len(ds) == 2 and {d.modality for d in ds.domains} == {"mri", "ct"}
    a, b = ds[0], ds[1]
    assert a.image.shape == (1, 16, 16, 16) and a.spacing == (1.0, 1.0, 1.0) and a.patient_id == "p1"
    assert a.labels["grade"] == 2 and a.labels["tissue"].shape == (16, 16, 16)
    assert a.labels["lesions"].tolist() == [[1, 2, 3, 5, 6, 7]]
    assert b.image.shape == (1, 16, 128, 128) and "grade" not in b.labels  # 4 slices padded to 16
    assert b.labels["lesions"].shape == (1, 6) and a.meta["affine"] is not None


def test_folder_dataset_errors(tmp_path):
    csv_path, tasks = make_folder(tmp_path, mask_shape=(8, 16, 16))
    with pytest.raises(ValueError, match=r"brain_mask.nii.gz: mask shape \(16, 16, 8\) differs from image"):
        FolderDataset(csv_path, tasks, split="train")[0]
    with pytest.raises(ValueError, match=r"missing task column\(s\) \['organ'\]"):
        FolderDataset(csv_path, [TaskSpec("organ", "multiclass", 3)])
    with pytest.raises(ValueError, match="no rows for split 'val'"):
        FolderDataset(csv_path, tasks, split="val")
    (tmp_path / "bad.csv").write_text("image,grade\nbrain.nii.gz,two\n")
    with pytest.raises(ValueError, match=r"bad.csv, row 2, column 'grade': cannot parse 'two'"):
        FolderDataset(tmp_path / "bad.csv", [TaskSpec("grade", "ordinal", 3)])
    nan_dir = tmp_path / "nan"
    nan_dir.mkdir()
    csv2, tasks2 = make_folder(nan_dir, nan=True)
    with pytest.raises(ValueError, match="brain.nii.gz: image has 1 NaN/Inf pixel"):
        FolderDataset(csv2, tasks2, split="test")[0]


def test_folder_through_the_registry(tmp_path):
    from medexplore.data.registry import build_dataset, dataset_tasks
    csv_path, tasks = make_folder(tmp_path)
    data = {"datasets": ["folder"], "csv": str(csv_path), "tasks": [t.to_dict() for t in tasks], "multiple": 16}
    ds = build_dataset(data, "test")
    assert len(ds) == 1 and [t.name for t in dataset_tasks(ds)] == ["grade", "volume", "tissue", "lesions"]
    with pytest.raises(ValueError, match="needs data.csv"):
        build_dataset({"datasets": ["folder"]}, "train")
