"""Calibrate a trained model's inference defaults on validation data (what whole-image inference uses).

* The sliding window: as many tokens as the largest validation image of each dimensionality, so that
  windows over a large image are the size the model was trained on.
* Per detection task, the box score threshold with the best F0.5 (a box is right when it overlaps an
  unmatched target with IoU >= 0.5; precision counts twice: a whole image is many windows); lesion-free
  images count every box they get as a false positive.
* Per two-class segmentation task, the foreground probability threshold with the best Dice over all
  validation pixels pooled.
* Per two-class segmentation task, the score a connected region of it needs to be kept (its mean
  probability; :mod:`medexplore.models.findings`), with the best pooled Dice.
* Per two-class segmentation task and dimensionality, the fewest pixels a kept region needs, from
  :data:`MIN_SIZES`, with the best F0.5 of the regions' boxes against the boxes of the target's regions
  (pixel Dice barely sees a one-voxel region; a user sees a whole false finding). Ties go to the smaller
  size: a lesion smaller than every validation lesion is still found.
* Per detection task, whether its boxes come from its head or are read off a two-class mask task
  labelled on the same images, at that mask's threshold (:mod:`medexplore.models.findings`): whichever
  reaches the better F0.5 (ties: the head). Head boxes get their best box threshold; boxes read off a mask
  get its region threshold, so that every region the mask keeps has its box and every box its region.

Threshold ties go to the higher threshold (fewer false alarms on healthy images).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.sample import collate
from ..errors import UserError
from ..models.boxes import box_iou
from ..models.findings import mask_regions
from ..models.heads import SegmentationHead
from ..models.inference_defaults import InferenceDefaults
from ..models.kinds import kind_entry, per_sample_predictions
from ..models.medformer import Medformer

__all__ = ["calibrate_inference", "THRESHOLDS", "Record", "best_threshold", "box_counts", "f_scores", "predict_records"]

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)  # the candidates, 0.05 apart
MIN_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # the candidate region sizes, in pixels
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


def f_scores(counts: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """The F-beta of each pooled (tp, fp, fn) row (beta 1: F1, which for pixels is the Dice; beta < 1 weighs
    precision more); 0 where a row has nothing to score."""
    tp, fp, fn = np.asarray(counts).T.astype(np.float64)
    b2 = beta ** 2
    denominator = (1 + b2) * tp + b2 * fn + fp
    return np.divide((1 + b2) * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def best_threshold(counts: np.ndarray, thresholds=THRESHOLDS, beta: float = 1.0) -> float:
    """The threshold with the best :func:`f_scores` from pooled (tp, fp, fn) rows; ties go to the higher."""
    score = f_scores(counts, beta)
    best = int(np.flatnonzero(score >= score.max() - 1e-12)[-1])
    return float(thresholds[best])


@dataclass
class Record:
    """One validation sample's labels and the predictions calibration scores: foreground probabilities per
    two-class mask task, (boxes, scores) per detection task."""

    labels: dict
    foreground: dict = field(default_factory=dict)
    boxes: dict = field(default_factory=dict)


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
    records: list[Record] = []
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        for sample in samples:
            spatial = tuple(sample.image.shape[1:])
            patch = model.config.patch_sizes[len(spatial)]
            dims = f"{len(spatial)}d"
            max_tokens[dims] = max(max_tokens.get(dims, 0), math.prod(math.ceil(s / patch) for s in spatial))
        samples = [s for s in samples if any(n in s.labels for n in (*mask_tasks, *box_tasks))]
        if samples:  # every mask and box head on them: a pairing is judged on the samples of its box task
            records += predict_records(model, samples, mask_tasks, box_tasks, device)
    labelled = {n for r in records for n in r.labels if n in (*mask_tasks, *box_tasks)}
    mask_thresholds = {}
    for name in (n for n in mask_tasks if n in labelled):
        mask_thresholds[name] = best_threshold(_pixel_counts([r for r in records if name in r.labels and name in r.foreground],
                                                             name))
    region_thresholds = {name: best_threshold(_region_counts([r for r in records if name in r.labels and name in r.foreground],
                                                             name, threshold))
                         for name, threshold in mask_thresholds.items()}
    min_sizes = {name: _best_min_sizes([r for r in records if name in r.labels and name in r.foreground], name,
                                       threshold, region_thresholds[name])
                 for name, threshold in mask_thresholds.items()}
    box_thresholds, paired = {}, {}
    for name in (n for n in box_tasks if n in labelled):
        scored = [r for r in records if name in r.labels and name in r.boxes]
        head = _box_counts(scored, name)
        candidates = {None: (best_threshold(head, beta=BOX_BETA), f_scores(head, BOX_BETA).max())}
        for mask in mask_thresholds:  # a mask labelled wherever the boxes are: the same finding
            if scored and all(mask in r.labels and mask in r.foreground for r in scored):
                at = region_thresholds[mask]  # the boxes of the regions the mask keeps
                counts = _box_counts(scored, name, mask, mask_thresholds[mask], min_sizes[mask])
                candidates[mask] = (at, f_scores(counts, BOX_BETA)[np.isclose(THRESHOLDS, at)][0])
        best = max(candidates, key=lambda m: (candidates[m][1], m is None))  # ties: the head
        box_thresholds[name] = candidates[best][0]
        if best is not None:
            paired[name] = best
    return InferenceDefaults(max_tokens, box_thresholds, mask_thresholds, region_thresholds, paired,
                             {name: sizes for name, sizes in min_sizes.items() if sizes})


def predict_records(model: Medformer, samples: list, mask_tasks: list[str], box_tasks: list[str], device="cpu"
                    ) -> list[Record]:
    """One :class:`Record` per sample: ``mask_tasks``' foreground probabilities and ``box_tasks``' head boxes."""
    predictions = model(collate(samples).to(device), tasks=[*mask_tasks, *box_tasks]).predictions
    records = [Record({n: y for n, y in s.labels.items() if y is not None}) for s in samples]
    for name in mask_tasks:
        for record, item in zip(records, SegmentationHead.per_sample(predictions[name], len(samples))):
            if item is not None:
                record.foreground[name] = item.float().softmax(0)[1].cpu()
    for name in box_tasks:
        for record, item in zip(records, per_sample_predictions(model.tasks[name].kind, predictions[name], len(samples))):
            if item is not None:
                record.boxes[name] = (item[0].float().cpu(), item[1].float().cpu())
    return records


def _box_counts(records: list[Record], name: str, mask: str | None = None, mask_threshold: float | None = None,
                min_sizes: dict[str, int] | None = None) -> np.ndarray:
    """Pooled :func:`box_counts` of task ``name``: its head's boxes, or those read off ``mask`` at ``mask_threshold``
    (the regions of at least ``min_sizes`` pixels, per dimensionality)."""
    counts = np.zeros((len(THRESHOLDS), 3), np.int64)
    for record in records:
        boxes, scores = record.boxes[name]
        if mask is not None:
            foreground = record.foreground[mask].numpy()
            regions = mask_regions(foreground, mask_threshold)
            boxes, scores = regions.scored_boxes(0.0, (min_sizes or {}).get(f"{foreground.ndim}d", 1))
        targets = torch.as_tensor(record.labels[name], dtype=torch.float32).reshape(-1, boxes.shape[-1])
        counts += box_counts(boxes, scores, targets)
    return counts


def _confusion(predicted, target) -> tuple[int, int, int]:
    """(true positive, false positive, false negative) pixels of boolean ``predicted`` against ``target``."""
    return int((predicted & target).sum()), int((predicted & ~target).sum()), int((~predicted & target).sum())


def _pixel_counts(records: list[Record], name: str) -> np.ndarray:
    """Pooled (tp, fp, fn) pixels of mask task ``name`` at each threshold."""
    counts = np.zeros((len(THRESHOLDS), 3), np.int64)
    for record in records:
        foreground = record.foreground[name]
        target = torch.as_tensor(record.labels[name]).bool()
        for row, threshold in enumerate(THRESHOLDS):
            counts[row] += _confusion(foreground >= threshold, target)
    return counts


def _region_counts(records: list[Record], name: str, threshold: float) -> np.ndarray:
    """Pooled (tp, fp, fn) pixels of mask task ``name`` at ``threshold`` keeping the regions whose score reaches
    each of :data:`THRESHOLDS`."""
    counts = np.zeros((len(THRESHOLDS), 3), np.int64)
    for record in records:
        regions = mask_regions(record.foreground[name].numpy(), threshold)
        target = torch.as_tensor(record.labels[name]).bool().numpy()
        for row, min_score in enumerate(THRESHOLDS):
            counts[row] += _confusion(regions.mask(min_score), target)
    return counts


def _best_min_sizes(records: list[Record], name: str, threshold: float, min_score: float) -> dict[str, int]:
    """Per dimensionality of ``records``, the :data:`MIN_SIZES` entry whose kept regions of mask task ``name``
    (at ``threshold``, scoring ``min_score``) box the target's regions with the best F0.5 (ties: the smaller);
    1 is left out (every region is kept without an entry)."""
    counts: dict[str, np.ndarray] = {}
    for record in records:
        foreground = record.foreground[name].numpy()
        dims = f"{foreground.ndim}d"
        regions = mask_regions(foreground, threshold)
        targets = mask_regions(np.asarray(record.labels[name]) > 0, 0.5).boxes
        rows = counts.setdefault(dims, np.zeros((len(MIN_SIZES), 3), np.int64))
        for row, size in enumerate(MIN_SIZES):
            boxes, scores = regions.scored_boxes(min_score, size)
            rows[row] += box_counts(boxes, scores, targets, thresholds=[0.0])[0]
    best = {dims: MIN_SIZES[int(np.argmax(f_scores(rows, BOX_BETA)))] for dims, rows in counts.items()}
    return {dims: size for dims, size in best.items() if size > 1}
