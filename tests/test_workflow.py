"""The embedded dataset, the demo job, prediction analysis and figures."""
import json

import numpy as np
import pytest
import torch

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


def test_a_lesion_that_saturation_would_hide_takes_the_other_sign_and_stays_in_range():
    from medexplore.data.embedded import add_lesions

    black = np.zeros((1, 24, 24), np.float32)  # a dark lesion on black would vanish: it is drawn bright
    for seed in range(6):
        image, mask, boxes = add_lesions(np.random.default_rng(seed), black, 1, None, radii=(4.0, 5.0), limits=(0.0, 1.0))
        assert len(boxes) == 1 and image.min() >= 0.0 and image.max() <= 1.0
        assert image[0][mask > 0].mean() > 0.5  # saturated at white, never lost in black
    grey = np.full((1, 24, 24), 0.5, np.float32)
    signs = {np.sign(add_lesions(np.random.default_rng(s), grey, 1, None, radii=(4.0, 5.0), limits=(-10.0, 10.0))[0][0, 12, 12]
                     - 0.5) for s in range(12)}
    assert signs == {-1.0, 1.0}  # far from the limits both signs stay


def test_lesion_samples_hold_visible_lesions_where_they_belong():
    from medexplore.data.examples import mni152_t1, mni152_with_lesions, retina_with_lesions
    from medexplore.data.transforms import robust_limits

    template = mni152_t1()
    healthy, brain = template.image, template.labels > 0
    brain_sd = healthy[0][brain].std()
    for seed in range(3):
        retina = retina_with_lesions(seed)
        assert retina.image.min() >= 0 and retina.image.max() <= 255 and len(retina.boxes) == 3
        volume = mni152_with_lesions(seed)
        assert brain[volume.labels > 0].mean() > 0.6  # lesions centred in the brain
        assert volume.image.shape == healthy.shape and len(volume.boxes) == 3
        assert volume.labels.dtype == np.uint8 and set(np.unique(volume.labels)) == {0, 1}
        lo, hi = robust_limits(torch.from_numpy(healthy))
        assert volume.image.min() >= lo and volume.image.max() <= hi + 1e-6
        for box in volume.boxes.astype(int):  # each lesion changes its core by at least one brain SD
            core = tuple(slice(int(a), int(b)) for a, b in zip(box[:3], box[3:]))
            change = np.abs(volume.image[0][core] - healthy[0][core])[volume.labels[core] > 0]
            assert change.mean() > brain_sd, (seed, box)


def test_matched_lesions_saturate_at_the_sources_range_and_stay_in_the_tissue():
    from medexplore.data.embedded import _crop, _lesioned, _load_sources

    src = _load_sources()
    limits = (src["t1"].min(), src["t1"].max())
    rng = np.random.default_rng(0)
    for _ in range(6):
        crop, sl = _crop(rng, src["t1"], 28, 3, src["brain"])
        tissue = src["tissue"][sl] > 0
        seed = int(rng.integers(1 << 30))
        plain, plain_mask, _ = _lesioned(np.random.default_rng(seed), crop, 3, tissue, limits, False, False)
        matched, mask, boxes = _lesioned(np.random.default_rng(seed), crop, 3, tissue, limits, True, False)
        lesion = mask > 0  # the same draws: only the lesions' contrast and saturation differ
        assert len(boxes) == 3 and np.array_equal(lesion, plain_mask > 0) and tissue[lesion].mean() > 0.6
        assert matched.min() >= limits[0] and matched.max() <= limits[1]
        ratio = crop[0][tissue].std() / crop.std()  # SDs of the brain, not of a crop with air and skull
        kept, drawn = (np.abs(image - crop)[0][lesion].mean() for image in (matched, plain))
        assert kept <= drawn * ratio * 1.05 + 1e-3  # saturation only takes away
        assert np.abs(matched - crop)[0][lesion].mean() > crop[0][tissue].std()  # yet every lesion stays visible
