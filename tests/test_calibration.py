"""Inference defaults: thresholds calibrated on validation data, stored in the checkpoint, used by infer_image."""
import json

import numpy as np
import pytest
import torch
from conftest import image, small_model

from medexplore.analysis.inference import infer_image, window_for
from medexplore.data.sample import Sample
from medexplore.errors import UserError
from medexplore.models import Domain, InferenceDefaults, TaskSpec
from medexplore.train.calibration import THRESHOLDS, best_threshold, box_counts, calibrate_inference
from medexplore.train.checkpoint import load_model, save_checkpoint, save_inference_defaults

MRI = Domain("3d", "mri", "brain")
XRAY = Domain("2d", "xray", "chest")
TASKS = [TaskSpec("lesion_mask", "segmentation", 2), TaskSpec("lesion_boxes", "detection", 2),
         TaskSpec("tissue", "segmentation", 3), TaskSpec("presence", "binary", 1)]


def test_box_counts_match_greedily_by_score_at_each_threshold():
    targets = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]])  # hit, duplicate, miss
    scores = torch.tensor([0.9, 0.6, 0.3])
    counts = box_counts(boxes, scores, targets, thresholds=[0.2, 0.5, 0.8, 0.95])
    # 0.2 keeps all three: one hit, the duplicate and the miss are false, one target is missed
    assert counts.tolist() == [[1, 2, 1], [1, 1, 1], [1, 0, 1], [0, 0, 2]]
    assert box_counts(boxes[:0], scores[:0], targets, thresholds=[0.5]).tolist() == [[0, 0, 2]]
    assert box_counts(boxes, scores, targets[:0], thresholds=[0.5]).tolist() == [[0, 2, 0]]


def test_best_threshold_has_the_best_f1_and_ties_go_to_the_higher_threshold():
    counts = np.array([[5, 5, 0], [5, 1, 0], [4, 0, 1], [0, 0, 5]])  # F1: 0.67, 0.91, 0.89, 0
    assert best_threshold(counts, [0.1, 0.2, 0.3, 0.4]) == 0.2
    assert best_threshold(np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1]]), [0.1, 0.2, 0.3]) == 0.2
    # F0.5 weighs precision: 10 hits with 6 false alarms (F1 0.77, F0.5 0.68) lose to 6 hits and none (0.75, 0.88)
    precision_or_recall = np.array([[10, 6, 0], [6, 0, 4]])
    assert best_threshold(precision_or_recall, [0.1, 0.2]) == 0.1
    assert best_threshold(precision_or_recall, [0.1, 0.2], beta=0.5) == 0.2


def _samples(n=6, size=16):
    out = []
    for i in range(n):
        mask = torch.zeros(size, size, size, dtype=torch.long)
        mask[2:8, 2:8, 2:8] = i % 2
        boxes = torch.tensor([[2.0, 2, 2, 8, 8, 8]]) if i % 2 else torch.zeros(0, 6)
        out.append(Sample(image(3, size, seed=i), MRI, {"lesion_mask": mask, "lesion_boxes": boxes}))
    out.append(Sample(image(2, 24, seed=9), XRAY, {"presence": 1}))  # no mask or boxes: only its size counts
    return out


def test_calibration_measures_windows_and_thresholds_and_travels_in_the_checkpoint(tmp_path):
    model = small_model(TASKS, seg_channels=8)
    defaults = calibrate_inference(model, _samples(), batch_size=4)
    assert defaults.max_tokens == {"3d": 64, "2d": 36}  # (16/4)^3 and (24/4)^2
    assert set(defaults.box_thresholds) == {"lesion_boxes"} and set(defaults.mask_thresholds) == {"lesion_mask"}
    assert defaults.box_thresholds["lesion_boxes"] in THRESHOLDS and defaults.mask_thresholds["lesion_mask"] in THRESHOLDS
    # tissue has three classes (argmax stays) and no labels here: it gets no threshold
    folder = save_checkpoint(tmp_path / "ckpt", model, {})
    save_inference_defaults(folder, defaults)
    assert json.loads((folder / "meta.json").read_text())["model"]["inference"]["max_tokens"] == {"3d": 64, "2d": 36}
    loaded, _ = load_model(folder)
    assert loaded.inference == defaults
    assert window_for(loaded, (40, 40, 40)) == (16, 16, 16)  # the calibrated 64 tokens, not the CPU budget's 512
    assert window_for(small_model(TASKS), (40, 40, 40)) == (32, 32, 32)


def test_infer_image_uses_the_models_thresholds_unless_told_otherwise():
    model = small_model(TASKS, seg_channels=8)
    volume = image(3, 16, seed=3)
    plain = infer_image(model, volume, MRI)
    model.inference = InferenceDefaults(mask_thresholds={"lesion_mask": 0.0}, box_thresholds={"lesion_boxes": 0.0})
    everything = infer_image(model, volume, MRI)
    assert everything.segmentations["lesion_mask"].all()  # every probability reaches 0
    assert (everything.segmentations["tissue"] == plain.segmentations["tissue"]).all()  # argmax as before
    assert len(everything.boxes["lesion_boxes"][1]) >= 1
    model.inference = InferenceDefaults(mask_thresholds={"lesion_mask": 1.0}, box_thresholds={"lesion_boxes": 1.0})
    nothing = infer_image(model, volume, MRI)
    assert not nothing.segmentations["lesion_mask"].any() and len(nothing.boxes["lesion_boxes"][1]) == 0
    assert len(infer_image(model, volume, MRI, box_threshold=0.0).boxes["lesion_boxes"][1]) >= 1  # the caller's wins


@pytest.mark.parametrize("data,match", [({"max_tokens": {"4d": 3}}, "4d"), ({"box_thresholds": {"b": 1.5}}, "'b'"),
                                        ({"mask_thresholds": {"m": "x"}}, "'m'"),
                                        ({"window": 3}, "unknown key")])
def test_bad_inference_defaults_name_the_value(data, match):
    with pytest.raises(UserError, match=match):
        InferenceDefaults.from_dict(data)
