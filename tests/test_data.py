"""MedMNIST table and reader, samples, collation, sampling and the two data views."""
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_npz

from medexplore.data import (
    MEDMNIST,
    MedMNIST,
    MixedDataset,
    PerAnnotationView,
    Sample,
    WeightedBatchSampler,
    balanced_weights,
    collate,
    medmnist_path,
)
from medexplore.models import Domain

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"


def test_table_covers_18_datasets():
    assert len(MEDMNIST) == 18
    assert sum(i.dims == 2 for i in MEDMNIST.values()) == 12 and sum(i.dims == 3 for i in MEDMNIST.values()) == 6
    assert MEDMNIST["chestmnist"].task().num_outputs == 14 and MEDMNIST["chestmnist"].task().kind.value == "multilabel"
    assert MEDMNIST["retinamnist"].task().kind.value == "ordinal"
    assert MEDMNIST["pneumoniamnist"].task().num_outputs == 1
    assert medmnist_path("organmnist3d", 64, "/r").as_posix() == "/r/organmnist3d_64.npz"
    with pytest.raises(ValueError, match="published at sizes \\(28, 64\\), not 128"):
        medmnist_path("organmnist3d", 128)
    with pytest.raises(ValueError, match="unknown MedMNIST dataset 'mnist'"):
        MedMNIST("mnist")


@pytest.mark.parametrize("flag", ["pathmnist", "chestmnist", "retinamnist", "nodulemnist3d"])
def test_reads_every_layout(tmp_path, flag):
    path = write_npz(tmp_path / f"{flag}.npz", flag)
    ds = MedMNIST(flag, "val", root=tmp_path)
    s = ds[0]
    info = MEDMNIST[flag]
    assert s.image.shape == (info.channels, *(28,) * info.dims) and s.domain == info.domain
    assert -1.0 <= s.image.min() and s.image.max() <= 1.0 and len(ds) == 6
    label = s.labels[flag]
    assert (label.shape == (14,)) if flag == "chestmnist" else isinstance(label, int)
    assert path.exists()


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/pneumoniamnist.npz is not on this machine")
def test_reads_shared_file_with_unofficial_split_sizes():
    ds = MedMNIST("pneumoniamnist", "train", path=SHARED)
    assert len(ds) == 3882 and sum(ds.label(i) for i in range(len(ds))) == 3494
    assert len(MedMNIST("pneumoniamnist", "test", path=SHARED)) == 624


OFFICIAL = SHARED.parent / "medmnist"


@pytest.mark.parametrize("counts, warns", [((1335, 192, 382), False), ((1335, 191, 382), False),
                                           ((1335, 190, 382), True)])
def test_both_official_count_sets_are_accepted_without_warning(tmp_path, caplog, counts, warns):
    assert MEDMNIST["vesselmnist3d"].count_sets == ((1335, 192, 382), (1335, 191, 382))
    assert MEDMNIST["organamnist"].count_sets == ((34581, 6491, 17778), (34561, 6491, 17778))
    assert MEDMNIST["pneumoniamnist"].count_sets == ((4708, 524, 624),)
    info = MEDMNIST["vesselmnist3d"]
    with np.load(write_npz(tmp_path / "v.npz", "vesselmnist3d", n=(1, 1, 1))) as small:
        arrays = {f"{split}_{kind}": np.repeat(small[f"{split}_{kind}"], n, axis=0)
                  for split, n in zip(("train", "val", "test"), counts) for kind in ("images", "labels")}
    np.savez(tmp_path / "vesselmnist3d.npz", **arrays)
    with caplog.at_level("WARNING", logger="medexplore.data.medmnist"):
        ds = MedMNIST("vesselmnist3d", "val", root=tmp_path)
    assert len(ds) == counts[1] and ds.domain == info.domain
    assert ("official: 191 or 192" in caplog.text) is warns


@pytest.mark.skipif(not OFFICIAL.exists(), reason="../shared/data/medmnist (official MedMNIST v2 files) is absent")
@pytest.mark.parametrize("flag", ["pneumoniamnist", "breastmnist", "retinamnist", "adrenalmnist3d", "vesselmnist3d"])
def test_reads_the_official_files_at_their_published_sizes(flag, caplog):
    with caplog.at_level("WARNING", logger="medexplore.data.medmnist"):
        sizes = tuple(len(MedMNIST(flag, split, root=OFFICIAL, download=False)) for split in ("train", "val", "test"))
    assert sizes in MEDMNIST[flag].count_sets and caplog.text == ""


def test_missing_file_offline_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"Put the medmnist npz file 'breastmnist_64.npz'.* at {tmp_path}"):
        MedMNIST("breastmnist", size=64, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="breastmnist.npz not found; put"):
        MedMNIST("breastmnist", root=tmp_path, download=False)


def test_corrupt_and_truncated_npz(tmp_path):
    good = write_npz(tmp_path / "pneumoniamnist.npz", "pneumoniamnist")
    truncated = tmp_path / "t.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"t.npz: not a readable npz file"):
        MedMNIST("pneumoniamnist", path=truncated)
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"this is not a zip")
    with pytest.raises(ValueError, match="g.npz: not a readable npz file"):
        MedMNIST("pneumoniamnist", path=garbage)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(train_labels=a["train_labels"][:-2]), r"train_labels has 10 rows for 12 images"),
    (lambda a: a.update(train_labels=a["train_labels"] + 5), r"train_labels values .* outside 0..1"),
    (lambda a: a.update(train_images=a["train_images"][:, :, :, None, None]), r"expects 2D images"),
    (lambda a: a.pop("train_labels"), r"missing array\(s\) \['train_labels'\]"),
    (lambda a: a.update(train_images=a["train_images"][:0], train_labels=a["train_labels"][:0]), "train_images is empty"),
])
def test_bad_arrays_name_the_file_and_field(tmp_path, change, message):
    good = write_npz(tmp_path / "x.npz", "pneumoniamnist")
    arrays = dict(np.load(good))
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        MedMNIST("pneumoniamnist", "train", path=tmp_path / "bad.npz")


def test_sample_rejects_nan_and_wrong_rank():
    img = torch.zeros(1, 8, 8)
    img[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"scan.nii: image has 1 NaN/Inf pixel"):
        Sample(img, Domain("2d"), meta={"source": "scan.nii"})
    with pytest.raises(ValueError, match="does not match its 3d domain"):
        Sample(torch.zeros(1, 8, 8), Domain("3d"))
    with pytest.raises(ValueError, match="empty list"):
        collate([])


def test_collate_fills_missing_labels_with_none():
    a = Sample(torch.zeros(1, 8, 8), Domain("2d"), {"x": 1}, patient_id="p1")
    b = Sample(torch.zeros(1, 4, 4, 4), Domain("3d"), {"y": 2.0}, patient_id="p2")
    batch = collate([a, b])
    assert batch.targets == {"x": [1, None], "y": [None, 2.0]}
    assert batch.meta["patient_id"] == ["p1", "p2"] and len(batch.groups) == 2


def test_sampler_is_reproducible_and_balances():
    weights = balanced_weights(["a"] * 90 + ["b"] * 10)
    s = WeightedBatchSampler(100, 50, weights, num_batches=40, seed=1)
    draws = torch.tensor([i for batch in s for i in batch])
    assert 0.45 < (draws >= 90).float().mean() < 0.55
    s2 = WeightedBatchSampler(100, 50, weights, num_batches=40, seed=1)
    assert list(s) == list(s2)
    s2.set_epoch(0, skip_batches=3)
    assert list(s2) == list(s)[3:]
    s2.set_epoch(1)
    assert list(s2) != list(s)
    shards = [list(WeightedBatchSampler(100, 50, weights, 40, 1, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*shards)] == list(s)
    plain = [i for b in WeightedBatchSampler(10, 5, seed=0) for i in b]
    assert sorted(plain) == list(range(10))
    with pytest.raises(ValueError, match="weights given for absent key"):
        balanced_weights(["a"], {"b": 1.0})


def test_mixed_dataset_and_decentralized_view(tmp_path):
    p = MedMNIST("pneumoniamnist", "train", path=write_npz(tmp_path / "p.npz", "pneumoniamnist"))
    n = MedMNIST("nodulemnist3d", "train", path=write_npz(tmp_path / "n.npz", "nodulemnist3d"))
    mixed = MixedDataset({"p": p, "n": n})
    assert len(mixed) == 24 and mixed.source_of(11) == "p" and mixed.source_of(12) == "n"
    assert mixed[12].domain.dimensionality == "3d"
    multi = [Sample(torch.zeros(1, 4, 4), Domain("2d"), {"a": 1, "b": 0}), Sample(torch.zeros(1, 4, 4), Domain("2d"), {"a": 0})]
    view = PerAnnotationView(multi, ["a", "b"])
    assert len(view) == 3 and [s.labels for s in view] == [{"a": 1}, {"b": 0}, {"a": 0}]
