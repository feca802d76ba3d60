"""Annotation variants of a training set (image-centric, decentralized, label fraction, kept tasks,
pseudo-labels) and the pseudo-label file format."""
from collections import Counter

import pytest
import torch

from medexplore.data import Sample
from medexplore.data.annotations import (
    AnnotationView,
    keep_tasks,
    load_pseudo_labels,
    pseudo_label_key,
    save_pseudo_labels,
    select_annotations,
)
from medexplore.data.registry import build_dataset, dataset_tasks
from medexplore.errors import UserError
from medexplore.models.tasks import Domain, TaskSpec


class Multi(torch.utils.data.Dataset):
    """12 images with tasks a, b, c (c only on the last 4)."""

    tasks = (TaskSpec("a", "binary", 1), TaskSpec("b", "binary", 1), TaskSpec("c", "regression", 1))

    def __init__(self):
        self.items = [Sample(torch.full((1, 4, 4), float(i)), Domain("2d"),
                             {"a": i % 2, "b": (i // 2) % 2, **({"c": torch.tensor([float(i)])} if i >= 8 else {})})
                      for i in range(12)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _task_counts(view):
    return Counter(t for s in view for t in s.labels)


def test_decentralized_and_image_centric_match_label_volume_per_task():
    data = Multi()
    dec = select_annotations(data, "decentralized", seed=3)
    ic = select_annotations(data, "image-centric", seed=3)
    assert len(dec) == 12 and all(len(s.labels) == 1 for s in dec)  # every image, one annotation each
    # group {a, b} (8 images): 4 labels of each task either way; group {a, b, c} (4 images): turns a, b, c, a
    # give decentralized 2, 1, 1 and image-centric 2 images with all three (within one per group)
    dec_counts, ic_counts = _task_counts(dec), _task_counts(ic)
    assert dec_counts == {"a": 6, "b": 5, "c": 1} and ic_counts == {"a": 6, "b": 6, "c": 2}
    assert _task_counts(dec)["a"] + _task_counts(dec)["b"] + _task_counts(dec)["c"] == 12
    assert len(ic) == 4 + 2 and all(s.labels == data[int(s.image[0, 0, 0])].labels for s in ic)
    # the image-centric images are among the decentralized ones; the views' labels_of agrees with indexing
    assert all(ic.labels_of(k) == ic[k].labels for k in range(len(ic)))
    assert select_annotations(data, "decentralized", seed=3)[5].labels == dec[5].labels  # seeded
    assert select_annotations(data) is data


def test_label_fraction_and_errors():
    data = Multi()
    assert len(select_annotations(data, label_fraction=0.5, seed=0)) == 6
    assert len(select_annotations(data, label_fraction=0.01, seed=0)) == 1
    assert {int(s.image[0, 0, 0]) for s in select_annotations(data, label_fraction=0.5, seed=1)} != \
        {int(s.image[0, 0, 0]) for s in select_annotations(data, label_fraction=0.5, seed=2)}
    with pytest.raises(ValueError, match="data.annotations must be one of"):
        select_annotations(data, "some")
    with pytest.raises(ValueError, match=r"data.label_fraction must be in \(0, 1\]"):
        select_annotations(data, label_fraction=0)


def test_keep_tasks_and_pseudo_labels_fill_only_missing_annotations(tmp_path):
    data = Multi()
    only_c = keep_tasks(data, ["c"])
    assert len(only_c) == 4 and [t.name for t in only_c.tasks] == ["c"] and all(set(s.labels) == {"c"} for s in only_c)
    assert keep_tasks(data, ["z"]) is None
    extra = {0: {"a": 0, "b": 1}, 8: {"c": torch.tensor([-1.0])}}
    view = select_annotations(data, "decentralized", seed=0, extra=extra)
    own = select_annotations(data, "decentralized", seed=0)
    assert set(view[0].labels) == {"a", "b"} and view[0].labels[next(iter(own[0].labels))] == \
        own[0].labels[next(iter(own[0].labels))]  # the image's own annotation wins over its pseudo-label
    path = tmp_path / "pl.safetensors"
    save_pseudo_labels(path, {pseudo_label_key("multi", 3, "a"): 1, pseudo_label_key("multi", 8, "c"): torch.tensor([2.5]),
                              pseudo_label_key("multi", 9, "boxes"): torch.zeros(0, 4)})
    loaded = load_pseudo_labels(path)
    assert loaded["multi"][3] == {"a": 1} and isinstance(loaded["multi"][3]["a"], int)
    assert torch.equal(loaded["multi"][8]["c"], torch.tensor([2.5])) and loaded["multi"][9]["boxes"].shape == (0, 4)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors is not a pseudo-label file"):
        load_pseudo_labels(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="must not contain '/'"):
        pseudo_label_key("a/b", 1, "t")
    with pytest.raises(ValueError, match="2 images but 1 annotation sets"):
        AnnotationView(data, [0, 1], [None])


def test_data_section_selects_annotations_on_the_training_split_only():
    base = {"datasets": ["embedded"]}
    full = build_dataset(base, "train")
    dec = build_dataset({**base, "annotations": "decentralized"}, "train")
    assert len(dec) == len(full) and all(len(dec.labels_of(i)) == 1 for i in range(0, len(dec), 37))
    val = build_dataset({**base, "annotations": "decentralized"}, "val")
    assert len(val[0].labels) >= 4  # validation keeps every annotation
    tissue = build_dataset({**base, "keep_tasks": ["tissue"]}, "test")
    assert [t.name for t in dataset_tasks(tissue)] == ["tissue"] and all(s.domain.dims == 3 for s in tissue)
    with pytest.raises(ValueError, match=r"data.keep_tasks: no dataset .* has task\(s\) \['tisue'\]"):
        build_dataset({**base, "keep_tasks": ["tisue"]}, "train")
    with pytest.raises(ValueError, match="data.annotations must be one of"):
        build_dataset({**base, "annotations": "centric"}, "train")


def test_nothing_found_labels_other_datasets_images_as_negatives_on_train_and_val_only(tmp_path):
    from conftest import write_npz

    from medexplore.data.sampling import labels_of

    write_npz(tmp_path / "breastmnist.npz", "breastmnist", n=(6, 4, 4))
    write_npz(tmp_path / "adrenalmnist3d.npz", "adrenalmnist3d", n=(6, 4, 4))
    write_npz(tmp_path / "pathmnist.npz", "pathmnist", n=(6, 4, 4))
    lesion_tasks = ["lesion", "lesion_count", "lesion_boxes", "lesion_mask"]
    data = {"datasets": ["embedded", "breastmnist", "adrenalmnist3d"], "root": str(tmp_path),
            "embedded": {"per_source_2d": 2, "num_3d": 4}, "nothing_found": lesion_tasks}
    for split in ("train", "val"):
        mixed = build_dataset(data, split)
        embedded = mixed.datasets["embedded"]
        assert set(embedded[0].labels) == set(build_dataset({**data, "nothing_found": None}, split)
                                              .datasets["embedded"][0].labels)  # its own labels, untouched
        for name, spatial in (("breastmnist", (28, 28)), ("adrenalmnist3d", (28, 28, 28))):
            sample = mixed.datasets[name][1]
            assert sample.labels[name] is not None  # its own label stays
            assert sample.labels["lesion"] == 0 and sample.labels["lesion_count"].tolist() == [0.0]
            assert sample.labels["lesion_boxes"].shape == (0, 2 * len(spatial))
            assert sample.labels["lesion_mask"].shape == spatial and not sample.labels["lesion_mask"].any()
            assert set(labels_of(mixed.datasets[name], 1)) == set(sample.labels)
        assert {t.name for t in dataset_tasks(mixed.datasets["breastmnist"])} >= set(lesion_tasks)
    test = build_dataset(data, "test")  # the test split stays as published
    assert "lesion" not in test.datasets["breastmnist"][0].labels
    with pytest.raises(UserError, match=r"data.nothing_found: no dataset among .* has task\(s\) \['tumour'\]"):
        build_dataset({**data, "nothing_found": ["tumour"]}, "train")
    with pytest.raises(UserError, match="task 'pathmnist': kind 'multiclass' has no 'nothing found' label"):
        build_dataset({"datasets": ["pathmnist", "breastmnist"], "root": str(tmp_path),
                       "nothing_found": ["pathmnist"]}, "val")
