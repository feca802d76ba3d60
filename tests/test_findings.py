"""Findings as mask regions: region scores, kept regions, boxes read off a mask, and calibration's choice."""
import numpy as np
import pytest
import torch
from conftest import image, small_model

from medexplore.analysis.inference import infer_image
from medexplore.data.sample import Sample
from medexplore.errors import UserError
from medexplore.models import Domain, InferenceDefaults, Medformer, TaskSpec
from medexplore.models.findings import mask_regions
from medexplore.train import calibration
from medexplore.train.calibration import Record, calibrate_inference

MRI = Domain("3d", "mri", "brain")
TASKS = [TaskSpec("lesion_mask", "segmentation", 2), TaskSpec("lesion_boxes", "detection", 2),
         TaskSpec("tissue", "segmentation", 3)]


def _two_regions() -> np.ndarray:
    foreground = np.zeros((10, 12), np.float32)
    foreground[1:3, 1:4] = 0.9  # 6 confident pixels
    foreground[6:9, 8:10] = [[0.6, 0.7], [0.8, 0.6], [0.7, 0.8]]  # 6 hesitant ones, mean 0.7
    foreground[0, 11] = 0.4  # below the mask threshold: no region
    return foreground


def test_mask_regions_label_box_and_score_each_connected_region():
    regions = mask_regions(_two_regions(), 0.5)
    assert regions.labels.max() == 2 and (regions.labels > 0).sum() == 12
    assert regions.boxes.tolist() == [[1, 1, 3, 4], [6, 8, 9, 10]]  # corners, ends exclusive: the regions' extent
    assert regions.scores.numpy() == pytest.approx([0.9, 0.7]) and regions.sizes.tolist() == [6, 6]
    kept = regions.mask(0.8)
    assert kept.sum() == 6 and kept[1:3, 1:4].all()  # the hesitant region goes whole, not pixel by pixel
    assert regions.mask(0.6).sum() == 12
    boxes, scores = regions.scored_boxes(0.8)
    assert boxes.tolist() == [[1, 1, 3, 4]] and scores.numpy() == pytest.approx([0.9])
    specks = _two_regions()
    specks[5, 0] = specks[9, 0] = 0.95  # two one-pixel regions, the surest of all
    regions = mask_regions(specks, 0.5)
    assert regions.sizes.tolist() == [6, 1, 6, 1] and regions.mask(0.8).sum() == 8
    assert regions.mask(0.8, min_size=2).sum() == 6 and regions.mask(0.0, min_size=7).sum() == 0
    assert regions.scored_boxes(0.0, min_size=6)[0].tolist() == [[1, 1, 3, 4], [6, 8, 9, 10]]
    empty = mask_regions(np.zeros((4, 4, 4)), 0.5)  # 3D, nothing found
    assert not empty.labels.any() and empty.boxes.shape == (0, 6) and empty.scores.shape == (0,) and not empty.mask(0).any()


def test_inference_reads_paired_boxes_off_the_mask_regions():
    model = small_model(TASKS, seg_channels=8)
    volume = image(3, 16, seed=3)
    # every pixel reaches 0: one region, the whole volume, scored by its mean foreground probability
    model.inference = InferenceDefaults(mask_thresholds={"lesion_mask": 0.0}, box_thresholds={"lesion_boxes": 0.0},
                                        paired_masks={"lesion_boxes": "lesion_mask"})
    found = infer_image(model, volume, MRI)
    boxes, scores = found.boxes["lesion_boxes"]
    assert boxes.tolist() == [[0, 0, 0, 16, 16, 16]] and 0 < scores[0] < 1
    assert found.segmentations["lesion_mask"].all()
    only_boxes = infer_image(model, volume, MRI, tasks=["lesion_boxes"])  # the mask runs, unreported
    assert set(only_boxes.segmentations) == set() and np.allclose(only_boxes.boxes["lesion_boxes"][0], boxes)
    assert len(infer_image(model, volume, MRI, box_threshold=float(scores[0]) + 1e-3).boxes["lesion_boxes"][1]) == 0
    model.inference = InferenceDefaults(mask_thresholds={"lesion_mask": 0.0}, region_thresholds={"lesion_mask": 1.0})
    assert not infer_image(model, volume, MRI).segmentations["lesion_mask"].any()  # no region scores 1
    for sizes, found in [({"3d": 16 ** 3}, True), ({"3d": 16 ** 3 + 1}, False), ({"2d": 16 ** 3 + 1}, True)]:
        model.inference = InferenceDefaults(mask_thresholds={"lesion_mask": 0.0}, paired_masks={"lesion_boxes": "lesion_mask"},
                                            box_thresholds={"lesion_boxes": 0.0}, region_min_sizes={"lesion_mask": sizes})
        result = infer_image(model, volume, MRI)  # the one region has 16^3 voxels; a 2D minimum leaves 3D alone
        assert result.segmentations["lesion_mask"].all() == found and len(result.boxes["lesion_boxes"][0]) == found


def _records(mask_quality: str) -> list[Record]:
    """Validation records of 2D crops with one square lesion each: a mask head exact or noisy, a box head
    noisy or exact."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        target = np.zeros((16, 16), np.int64)
        lo = 2 + i % 6
        target[lo:lo + 5, lo:lo + 5] = 1
        truth = torch.tensor([[lo, lo, lo + 5, lo + 5]], dtype=torch.float32)
        exact = torch.as_tensor(target, dtype=torch.float32) * 0.75
        noisy = torch.as_tensor(rng.uniform(0, 1, (16, 16)), dtype=torch.float32)
        elsewhere = torch.tensor([[0.0, 10, 3, 13]])
        good_mask = mask_quality == "good"
        records.append(Record({"lesion_mask": target, "lesion_boxes": truth},
                               {"lesion_mask": exact if good_mask else noisy},
                               {"lesion_boxes": (elsewhere if good_mask else truth, torch.tensor([0.8]))}))
    return records


@pytest.mark.parametrize("mask_quality", ["good", "bad"])
def test_calibration_reads_boxes_off_the_mask_when_they_score_better(monkeypatch, mask_quality):
    model = small_model(TASKS, seg_channels=8)
    monkeypatch.setattr(calibration, "predict_records", lambda model, samples, masks, boxes, device: _records(mask_quality))
    samples = [Sample(image(2, 16), Domain("2d", "xray", "chest"), {"lesion_mask": torch.zeros(16, 16)})]
    defaults = calibrate_inference(model, samples)
    if mask_quality == "good":  # the regions are the lesions (score 0.75); the head's boxes miss them
        assert defaults.paired_masks == {"lesion_boxes": "lesion_mask"}
        assert defaults.box_thresholds["lesion_boxes"] == 0.75 and defaults.region_thresholds["lesion_mask"] == 0.75
    else:  # the head boxes every lesion; noise makes many regions
        assert defaults.paired_masks == {} and defaults.box_thresholds["lesion_boxes"] == 0.8


def _square(target: np.ndarray, at: tuple[int, int]) -> torch.Tensor:
    target[at[0]:at[0] + 5, at[1]:at[1] + 5] = 1
    return torch.tensor([at[0], at[1], at[0] + 5, at[1] + 5], dtype=torch.float32)


def test_paired_boxes_are_those_of_the_regions_the_mask_keeps(monkeypatch):
    """Every record: a sure lesion (0.95); half of them also a hesitant lesion and a false region (0.6). Pixel
    Dice keeps the hesitant regions (0.857 against 0.8); F0.5 of boxes alone would drop them (0.909 against
    0.789 at 0.6). The boxes follow the mask: a region without its box (or a box without its region) would
    show the user two answers."""
    records = []
    for i in range(8):
        target, foreground = np.zeros((24, 24), np.int64), torch.zeros(24, 24)
        boxes = [_square(target, (1, 1))]
        foreground[1:6, 1:6] = 0.95
        if i % 2:
            boxes.append(_square(target, (10, 10)))
            foreground[10:15, 10:15] = 0.6
            foreground[17:22, 1:6] = 0.6  # no lesion there
        records.append(Record({"lesion_mask": target, "lesion_boxes": torch.stack(boxes)}, {"lesion_mask": foreground},
                              {"lesion_boxes": (torch.tensor([[0.0, 18, 3, 21]]), torch.tensor([0.8]))}))
    monkeypatch.setattr(calibration, "predict_records", lambda model, samples, masks, boxes, device: records)
    samples = [Sample(image(2, 16), Domain("2d", "xray", "chest"), {"lesion_mask": torch.zeros(16, 16)})]
    defaults = calibrate_inference(small_model(TASKS, seg_channels=8), samples)
    assert defaults.region_thresholds["lesion_mask"] == 0.6 and defaults.paired_masks == {"lesion_boxes": "lesion_mask"}
    assert defaults.box_thresholds["lesion_boxes"] == 0.6
    assert calibration.best_threshold(calibration._box_counts(records, "lesion_boxes", "lesion_mask", 0.6), beta=0.5) == 0.95


def test_calibration_sets_the_smallest_region_size_that_drops_the_specks_per_dimensionality(monkeypatch):
    """2D records: a 25-pixel lesion (0.9) each, and in half of them a false 2-pixel speck scoring higher
    (0.95), which no score threshold removes. 3D records: a lesion and no speck."""
    records = []
    for i in range(8):
        target, foreground = np.zeros((16, 16), np.int64), torch.zeros(16, 16)
        target[2:7, 2:7] = 1
        foreground[2:7, 2:7] = 0.9
        if i % 2:
            foreground[12, 12:14] = 0.95
        records.append(Record({"lesion_mask": target}, {"lesion_mask": foreground}))
    for _ in range(4):
        target, foreground = np.zeros((8, 8, 8), np.int64), torch.zeros(8, 8, 8)
        target[1:4, 1:4, 1:4] = 1
        foreground[1:4, 1:4, 1:4] = 0.9
        records.append(Record({"lesion_mask": target}, {"lesion_mask": foreground}))
    monkeypatch.setattr(calibration, "predict_records", lambda model, samples, masks, boxes, device: records)
    samples = [Sample(image(2, 16), Domain("2d", "xray", "chest"), {"lesion_mask": torch.zeros(16, 16)})]
    defaults = calibrate_inference(small_model(TASKS, seg_channels=8), samples)
    # sizes 3 to 24 all drop the specks and keep the lesions: the smallest; 3D needs no minimum
    assert defaults.region_min_sizes == {"lesion_mask": {"2d": 3}}
    assert InferenceDefaults.from_dict(defaults.to_dict()) == defaults
    assert defaults.region_min_size("lesion_mask", "3d") == 1 and defaults.region_min_size("tissue", "2d") == 1


def test_pairs_that_name_no_such_task_are_refused():
    spec = small_model(TASKS).spec_dict()
    for pair, match in [({"tissue": "lesion_mask"}, "'tissue' is not a detection task"),
                        ({"lesion_boxes": "tissue"}, "'tissue'.*not a two-class"),
                        ({"lesion_boxes": "nothing"}, "'nothing'")]:
        spec["inference"] = {"paired_masks": pair}
        with pytest.raises(UserError, match=match):
            Medformer.from_spec_dict(spec)
    with pytest.raises(UserError, match="region_thresholds: task 'm'"):
        InferenceDefaults.from_dict({"region_thresholds": {"m": 2}})
    for sizes in ({"4d": 3}, {"2d": 0}, {"3d": 2.5}, 3):
        with pytest.raises(UserError, match="region_min_sizes: task 'm'"):
            InferenceDefaults.from_dict({"region_min_sizes": {"m": sizes}})
    with pytest.raises(UserError, match="paired_masks: task 'b'"):
        InferenceDefaults.from_dict({"paired_masks": {"b": 3}})
