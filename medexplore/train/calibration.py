"""Calibrate a trained model's inference defaults on validation data (what whole-image inference uses).

* The sliding window: as many tokens as the largest validation image of each dimensionality, so that
  windows over a large image are the size the model was trained on.
* Per detection task, the box score threshold with the best F0.5 (a box is right when it overlaps an
  unmatched target with IoU >= 0.5; precision counts twice: a whole image is many windows); lesion-free
  images count every box they get as a false positive.
* Per two-class segmentation task, the foreground probability threshold with the best Dice over all
  validation pixels pooled.

Ties go to the higher threshold (fewer false alarms on healthy images).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.sample import collate
from ..errors import UserError
from ..models.boxes import box_iou
from ..models.heads import SegmentationHead
from ..models.inference_defaults import InferenceDefaults
from ..models.kinds import kind_entry, per_sample_predictions
from ..models.medformer import Medformer

__all__ = ["calibrate_inference", "THRESHOLDS", "best_threshold", "box_counts"]

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)  # the candidates, 0.05 apart
# boxes: F0.5, precision weighted twice recall. A whole image is tens to hundreds of windows, so a false-alarm
# rate per validation crop that F1 accepts (0.20 gave 39 boxes on the healthy MNI152 volume) adds up
BOX_BETA = 0.5


def box_counts(boxes: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor, thresholds=THRESHOLDS,
               iou: float = 0.5) -> np.ndarray:
    """(len(thresholds), 3) true positives, false positives and false negatives of one image's boxes kept at
    each score threshold, matched greedily by score to ``targets`` (K, 2d)."""
    counts = np.zeros((len(thresholds), 3), np.int64)
    order = scores.argsort(descending=True)
    boxes, scores = boxes[order].float(), scores[order].float()
    overlaps = box_iou(boxes, targets.float()) if len(boxes) and len(targets) else torch.zeros(len(boxes), 0)
    for row, threshold in enumerate(thresholds):
        taken = torch.zeros(overlaps.shape[1], dtype=torch.bool)
        tp = 0
        kept = int((scores >= threshold).sum())
        for i in range(kept):
            free = overlaps[i].masked_fill(taken, -1.0)
            if free.numel() and free.max() >= iou:
                taken[free.argmax()] = True
                tp += 1
        counts[row] = (tp, kept - tp, len(targets) - tp)
    return counts


def best_threshold(counts: np.ndarray, thresholds=THRESHOLDS, beta: float = 1.0) -> float:
    """The threshold with the best F-beta from pooled (tp, fp, fn) rows (beta 1: F1, which for pixels is the
    Dice; beta < 1 weighs precision more); ties go to the higher threshold."""
    tp, fp, fn = counts.T.astype(np.float64)
    b2 = beta ** 2
    denominator = (1 + b2) * tp + b2 * fn + fp
    score = np.divide((1 + b2) * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    best = int(np.flatnonzero(score >= score.max() - 1e-12)[-1])
    return float(thresholds[best])


@torch.no_grad()
def calibrate_inference(model: Medformer, dataset: Dataset, batch_size: int = 32, device="cpu") -> InferenceDefaults:
    """The :class:`InferenceDefaults` of ``model`` measured on ``dataset`` (pass the validation split)."""
    if not len(dataset):
        raise UserError("calibration needs a non-empty validation set")
    model.eval().to(device)
    outputs = {name: kind_entry(spec.kind).output for name, spec in model.tasks.items()}
    mask_tasks = [n for n, o in outputs.items() if o == "mask" and model.tasks[n].num_outputs == 2]
    box_tasks = [n for n, o in outputs.items() if o == "boxes"]
    max_tokens: dict[str, int] = {}
    pixel_counts = {n: np.zeros((len(THRESHOLDS), 3), np.int64) for n in mask_tasks}
    boxes_counted = {n: np.zeros((len(THRESHOLDS), 3), np.int64) for n in box_tasks}
    labelled = set()
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        for sample in samples:
            spatial = tuple(sample.image.shape[1:])
            patch = model.config.patch_sizes[len(spatial)]
            dims = f"{len(spatial)}d"
            max_tokens[dims] = max(max_tokens.get(dims, 0), math.prod(math.ceil(s / patch) for s in spatial))
        wanted = [n for n in (*mask_tasks, *box_tasks) if any(n in s.labels for s in samples)]
        samples = [s for s in samples if any(n in s.labels for n in wanted)]
        if not wanted:
            continue
        predictions = model(collate(samples).to(device), tasks=wanted).predictions
        for name in wanted:
            if name in mask_tasks:
                items = SegmentationHead.per_sample(predictions[name], len(samples))
            else:
                items = per_sample_predictions(model.tasks[name].kind, predictions[name], len(samples))
            for sample, item in zip(samples, items):
                label = sample.labels.get(name)
                if label is None or item is None:
                    continue
                labelled.add(name)
                if name in mask_tasks:
                    foreground = item.float().softmax(0)[1].cpu()
                    target = torch.as_tensor(label).bool()
                    for row, threshold in enumerate(THRESHOLDS):
                        predicted = foreground >= threshold
                        pixel_counts[name][row] += (int((predicted & target).sum()), int((predicted & ~target).sum()),
                                                    int((~predicted & target).sum()))
                else:
                    boxes, scores = item
                    targets = torch.as_tensor(label, dtype=torch.float32).reshape(-1, boxes.shape[-1])
                    boxes_counted[name] += box_counts(boxes, scores, targets)
    return InferenceDefaults(max_tokens,
                             {n: best_threshold(c, beta=BOX_BETA) for n, c in boxes_counted.items() if n in labelled},
                             {n: best_threshold(c) for n, c in pixel_counts.items() if n in labelled})
