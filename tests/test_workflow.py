"""The embedded dataset, the demo job, prediction analysis and figures."""
import json

import numpy as np
import pytest

from medexplore.analysis import predict_samples
from medexplore.data import PerAnnotationView
from medexplore.data.embedded import EMBEDDED_TASKS, EmbeddedConfig, EmbeddedDataset, build_embedded
from medexplore.data.registry import dataset_tasks, vocab_for
from medexplore.errors import UserError
from medexplore.experiments.demo import demo, gallery_samples
from medexplore.models import create_model
from medexplore.viz import prediction_gallery, training_curves

TINY = {"depth": 1, "embed_dim": 24, "num_heads": 2}


@pytest.fixture(scope="module")
def train_set():
    return EmbeddedDataset("train")


def test_embedded_is_deterministic_and_multi_annotated(train_set):
    small = EmbeddedConfig(per_source_2d=2, num_3d=2)
    a, b = build_embedded(small), build_embedded(small)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(build_embedded(EmbeddedConfig(seed=1, per_source_2d=2, num_3d=2))["images2d"], a["images2d"])
    dims = {s.domain.dimensionality for s in (train_set[i] for i in range(len(train_set)))}
    modalities = {d.modality for d in train_set.domains}
    assert dims == {"2d", "3d"} and {"mri", "ct", "fundus", "pathology"} <= modalities
    for i in range(0, len(train_set), 37):
        s = train_set[i]
        n = int(s.labels["lesion_count"])
        assert s.labels["lesion"] == int(n > 0) and len(s.labels["lesion_boxes"]) == n
        assert s.labels["lesion_mask"].shape == s.image.shape[1:]
        assert (s.labels["lesion_mask"].sum() > 0) == (n > 0)
        assert ("tissue" in s.labels) == (s.domain.dimensionality == "3d")
        if n:  # every box encloses lesion voxels
            lo, hi = s.labels["lesion_boxes"][0].split(s.image.dim() - 1)
            region = s.labels["lesion_mask"][tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
            assert region.sum() > 0
    assert [t.name for t in dataset_tasks(train_set)] == [t.name for t in EMBEDDED_TASKS]


def test_background_crops_are_lesion_free_and_reach_outside_the_tissue():
    arrays = build_embedded(EmbeddedConfig(per_source_2d=3, num_3d=12, size_3d=24, background=1.0))
    assert arrays["counts2d"].sum() == 0 and arrays["counts3d"].sum() == 0 and arrays["masks3d"].sum() == 0
    assert (arrays["tissue3d"] == 0).mean() > 0.3  # crops centred anywhere: much air and skull
    centred = build_embedded(EmbeddedConfig(per_source_2d=3, num_3d=12, size_3d=24, lesion_free=1.0))
    assert (centred["tissue3d"] == 0).mean() < (arrays["tissue3d"] == 0).mean()
    with pytest.raises(UserError, match="background"):
        EmbeddedConfig(background=1.5)


def test_data_embedded_section_sets_the_crops_and_names_unknown_keys():
    from medexplore.data.registry import embedded_config

    config = embedded_config({"embedded": {"size_2d": 48, "background": 0.25}, "volume_size": 28, "seed": 3})
    assert (config.size_2d, config.size_3d, config.background, config.seed) == (48, 28, 0.25, 3)
    with pytest.raises(UserError, match=r"data.embedded: unknown option\(s\) \['size'\]"):
        embedded_config({"embedded": {"size": 48}})
    with pytest.raises(UserError, match="data.embedded.background"):
        embedded_config({"embedded": {"background": "a quarter"}})


def test_image_centric_vs_decentralized_views(train_set):
    view = PerAnnotationView(train_set, ["lesion", "tissue"])
    n3d = sum(1 for dims, _ in train_set.index if dims == "3d")
    assert len(view) == len(train_set) + n3d
    assert all(len(view[k].labels) == 1 for k in range(0, len(view), 50))


def test_predictions_and_figures(train_set, tmp_path):
    model = create_model("medformer_tiny", tasks=dataset_tasks(train_set), patch_size=4, vocab=vocab_for(train_set), **TINY)
    samples = [train_set[i] for i in (0, 1, len(train_set) - 1)]
    results = predict_samples(model, samples)
    assert results[-1]["predictions"]["tissue"].shape == samples[-1].image.shape[1:]
    assert "tissue" not in results[0]["predictions"]
    assert results[0]["predictions"]["lesion_boxes"]["boxes"].shape == (3, 4)
    assert 0 <= results[0]["predictions"]["lesion"] <= 1
    fig = prediction_gallery(results, "lesion_mask", "lesion_boxes")
    fig.savefig(tmp_path / "g.png")
    records = [{"epoch": e, "train": {"loss": 1.0 / e, "lesion": 0.5 / e}, "val": {"lesion": {"auc": 0.5 + e / 10}}}
               for e in (1, 2, 3)]
    curves = training_curves(records)
    assert len(curves.axes[0].lines) == 2 and len(curves.axes[1].lines) == 1
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_gallery_shows_2d_and_3d_samples_with_lesions_at_the_lesion_slice(train_set, tmp_path):
    samples = gallery_samples(train_set, "lesion_mask", 8)
    assert len(samples) == 8 and [s.image.dim() - 1 for s in samples] == [2] * 4 + [3] * 4
    assert all(s.labels["lesion_mask"].any() for s in samples)
    volume = next(s for s in samples if s.image.dim() == 4)
    mask = volume.labels["lesion_mask"].numpy()
    fig = prediction_gallery([{"image": volume.image.numpy(), "domain": volume.domain, "labels": volume.labels,
                               "predictions": {"lesion_mask": mask}}], "lesion_mask")
    depth = int((mask > 0).sum(axis=(1, 2)).argmax())
    assert f"z={depth}" in fig.axes[0].get_title()
    shown = fig.axes[1].get_images()[0].get_array()  # the true mask, at the slice with the most lesion
    assert np.array_equal(np.asarray(shown), mask[depth]) and np.asarray(shown).any()


def test_demo_runs_end_to_end(tmp_path):
    summary = demo(tmp_path / "demo", pretrain_epochs=1, epochs=1, model=TINY)
    metrics = summary["test_metrics"]
    assert set(metrics) == {t.name for t in EMBEDDED_TASKS}
    assert "auc" in metrics["lesion"] and "dice" in metrics["tissue"] and "map@0.5" in metrics["lesion_boxes"]
    assert "mae" in metrics["lesion_count"]
    figures = tmp_path / "demo" / "multitask" / "figures"
    assert sorted(summary["figures"]) == sorted(str(figures / f) for f in ("predictions.png", "training_curves.png"))
    assert all((figures / f).stat().st_size > 1000 for f in ("predictions.png", "training_curves.png"))
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["test_metrics"] == json.loads(json.dumps(metrics))
    assert (tmp_path / "demo" / "summary.json").exists()
    assert (tmp_path / "demo" / "pretrain" / "checkpoints" / "last" / "model.safetensors").exists()
    with pytest.raises(FileExistsError):
        demo(tmp_path / "demo", pretrain_epochs=1, epochs=1, model=TINY)
