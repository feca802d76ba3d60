"""One table of task kinds: everything that differs between kinds, in one registered entry each.

An entry says how a kind's head is built, how its raw output becomes per-sample predictions, which
metrics score it (and which one is its headline), how its labels and predictions read in a table,
what an attribution explains, how a prediction becomes a pseudo-label, and how it shows in a viewer.
Heads, evaluation, embeddings, attribution, inference, pseudo-labelling and the napari plugin read
this table instead of testing ``kind ==``; a new kind is one :func:`register_kind` call.

Example:
    >>> kind_entry("binary").headline
    'auc'
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .heads import DetectionHead, OrdinalHead, SegmentationHead, TaskHead, VectorHead
from .metrics import (
    classification_metrics,
    detection_metrics,
    dice_per_class,
    ordinal_probabilities,
    ordinal_rank,
    regression_metrics,
)
from .tasks import KINDS, TaskSpec

__all__ = ["KindEntry", "KINDS", "register_kind", "kind_entry", "task_scores", "per_sample_predictions", "score_task",
           "monitor_metrics", "headline_metric", "headline_of", "OUTPUTS", "HeadDims"]

OUTPUTS = ("vector", "mask", "boxes")  # what a kind predicts per sample: a vector, a mask, or boxes with scores


@dataclass(frozen=True)
class HeadDims:
    """The model dimensions a head is built from."""

    dim: int
    in_chans: int
    patch_sizes: dict[int, int]  # patch edge per number of spatial dimensions
    seg_channels: int
    num_features: int
    seg_full_channels: int | None = None


@dataclass(frozen=True)
class KindEntry:
    """One task kind.

    Args:
        name: the kind's name (``TaskSpec.kind``).
        build_head: ``(spec, HeadDims) -> TaskHead``.
        output: ``vector`` (one vector per sample), ``mask`` (a label map) or ``boxes`` (boxes and scores);
            decides how inference blends windows and how the plugin shows the result (features table,
            Labels layer, Shapes layer) and which labels an augmentation moves with the image.
        metrics: validation metrics where higher is better (``train.monitor`` choices).
        headline: the metric tables and figures lead with (the first of ``metrics``, or ``mae``).
        min_outputs: the smallest ``num_outputs``; ``losses``: the loss variants ``TaskSpec.loss`` may name.
        scores: raw vector output -> probabilities (classification) or values (regression).
        per_sample: ``(raw, num_samples) -> list`` of plain per-sample items (None where nothing).
        score: ``(spec, labels, items) -> metrics`` over the labelled samples.
        label_cell, prediction_cell: a label / per-sample item as one table cell.
        agreement: ``(label cell, prediction cell) -> ("correct" | "error", value)`` or None.
        explain_outputs: raw output -> ``(N, K)`` scalars an attribution explains; ``default_target``: which K.
        hard_label: ``(spec, item, logits) -> (label, confidence)`` for pseudo-labelling.
        output_names: ``(spec, count) -> names`` of a vector output's entries in tables and viewers.
        prior_offset: ``(data_share, sampled_share) -> offset`` for a class kind: given each class's share of the
            training labels and of what the sampler draws, what to add to the raw output in the loss so that the
            model's probabilities stay those of the data (logit adjustment; :mod:`medexplore.train.priors`).
            Only kinds whose offset is exact have one, and only they are class-balanced: re-weighting ordinal
            grades moves each CORAL threshold by a different, data-dependent amount, so ordinal has none.
    """

    name: str
    build_head: Callable[[TaskSpec, HeadDims], TaskHead]
    output: str
    metrics: tuple[str, ...]
    headline: str
    per_sample: Callable[[object, int], list]
    score: Callable[[TaskSpec, list, list], dict]
    label_cell: Callable[[object], object]
    prediction_cell: Callable[[object], object]
    agreement: Callable[[object, object], tuple[str, object] | None]
    explain_outputs: Callable[[object], Tensor]
    default_target: Callable[[Tensor], int]
    hard_label: Callable[[TaskSpec, object, Tensor | None], tuple[object, float]]
    scores: Callable[[Tensor], Tensor] | None = None
    min_outputs: int = 1
    losses: tuple[str, ...] = ("",)
    queries_per_output: bool = False  # one Output-Adaptformer query per class or box
    higher_is_better: bool = True
    output_names: Callable[[TaskSpec, int], list[str]] = field(default=lambda spec, count: _output_names(spec, count))
    prior_offset: Callable[[Tensor, Tensor], Tensor] | None = None
    # the label of an image known to show none of the task's findings (given its spatial shape); None where
    # the kind has no such label (a multiclass image always has some class)
    nothing_found: Callable[[TaskSpec, tuple[int, ...]], object] | None = None

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise UserError(f"kind {self.name!r}: output must be one of {OUTPUTS}, got {self.output!r}")
        if self.headline not in (*self.metrics, "mae"):
            raise UserError(f"kind {self.name!r}: headline {self.headline!r} is not among its metrics {self.metrics}")


def register_kind(entry: KindEntry) -> KindEntry:
    """Add ``entry`` to the table (a new kind name; built-in kinds cannot be replaced)."""
    if entry.name in KINDS:
        raise UserError(f"task kind {entry.name!r} is already registered")
    KINDS[entry.name] = entry
    return entry


def kind_entry(kind: str) -> KindEntry:
    if str(kind) not in KINDS:
        raise UserError(f"unknown task kind {str(kind)!r}; registered: {sorted(KINDS)}")
    return KINDS[str(kind)]


def task_scores(kind: str, prediction: Tensor) -> Tensor:
    """Probabilities (classification) or values (regression) from a vector head's raw output."""
    entry = kind_entry(kind)
    if entry.scores is None:
        raise UserError(f"task kind {entry.name!r} has no vector scores (its output is {entry.output})")
    return entry.scores(prediction)


def per_sample_predictions(kind: str, prediction, num_samples: int) -> list:
    """One task's raw head output as one plain item per sample (``None`` where it produced nothing)."""
    return kind_entry(kind).per_sample(prediction, num_samples)


def score_task(spec: TaskSpec, items: list) -> dict:
    """The metrics of ``spec``'s kind over ``(label, prediction)`` pairs, and their count ``n``."""
    result = kind_entry(spec.kind).score(spec, [y for y, _ in items], [p for _, p in items])
    result["n"] = len(items)
    return result


def monitor_metrics() -> tuple[str, ...]:
    """Every metric ``train.monitor`` may name: ``headline`` and each registered kind's metrics."""
    return ("headline",) + tuple(dict.fromkeys(m for e in KINDS.values() for m in e.metrics))


def headline_metric(metrics: dict, kind: str | None = None) -> tuple[str, float] | None:
    """A task's headline metric and its value (None when ``metrics`` lacks it). Without ``kind``, the
    first registered kind's headline that ``metrics`` reports (auc, mae, dice, map@0.5)."""
    names = [kind_entry(kind).headline] if kind is not None else dict.fromkeys(e.headline for e in KINDS.values())
    for name in names:
        if name in metrics:
            return name, float(metrics[name])
    return None


def headline_of(records: list[dict]) -> str | None:
    """The headline metric's name over several metrics dicts of one task (e.g. one per epoch)."""
    return next((found[0] for m in records if (found := headline_metric(m))), None)


# ---------------------------------------------------------------------------- shared pieces
def _output_names(spec: TaskSpec, count: int) -> list[str]:
    return list(spec.label_names) or [f"output {k}" for k in range(count)]


def _probability_name(spec: TaskSpec, count: int) -> list[str]:
    return [f"P({spec.label_names[-1] if spec.label_names else spec.name})"]


def _scalar(value) -> float | None:
    t = torch.as_tensor(value)
    return float(t.reshape(-1)[0]) if t.numel() == 1 else None


def _vector_items(scores: Callable[[Tensor], Tensor]) -> Callable[[Tensor, int], list]:
    return lambda prediction, num_samples: list(scores(prediction).cpu())


def _classification_score(spec: TaskSpec, labels: list, preds: list) -> dict:
    y = torch.stack([y.float().reshape(-1) for y in labels]).numpy()
    return classification_metrics(str(spec.kind), y, torch.stack(preds).numpy())


def _class_index_label(spec, item, logits) -> tuple[object, float]:
    return int(item.argmax()), float(item.max())


def _ordinal_hard_label(spec, item, logits) -> tuple[object, float]:
    grade = int(ordinal_rank(item))
    return grade, float(item[grade])


def _first_output(outputs: Tensor) -> int:
    return 0


def _argmax_output(outputs: Tensor) -> int:
    return int(outputs[0].argmax())


# ---------------------------------------------------------------------------- the built-in kinds
def _binary_hard_label(spec, item, logits):
    p = float(item.reshape(-1)[0])
    return int(p > 0.5), max(p, 1 - p)


def _sigmoid(prediction: Tensor) -> Tensor:
    return prediction.float().sigmoid()


def _softmax(prediction: Tensor) -> Tensor:
    return prediction.float().softmax(-1)


def _ordinal(prediction: Tensor) -> Tensor:
    return ordinal_probabilities(prediction.float())


def _values(prediction: Tensor) -> Tensor:
    return prediction.float()


_SHARE_FLOOR = 1e-6  # a class share of 0 or 1 would give an infinite logit


def _logit(share: Tensor) -> Tensor:
    share = share.clamp(_SHARE_FLOOR, 1 - _SHARE_FLOOR)
    return share.log() - (1 - share).log()


def _binary_offset(data: Tensor, sampled: Tensor) -> Tensor:
    """Logit of the sampled positive share minus the data's (one output: the positive logit)."""
    return _logit(sampled[1]) - _logit(data[1])


def _multiclass_offset(data: Tensor, sampled: Tensor) -> Tensor:
    return sampled.clamp_min(_SHARE_FLOOR).log() - data.clamp_min(_SHARE_FLOOR).log()


_CLASSIFICATION = ("auc", "acc", "balanced_acc", "f1_macro")

register_kind(KindEntry(
    "binary", lambda spec, d: VectorHead(spec, d.dim), "vector", _CLASSIFICATION, "auc",
    per_sample=_vector_items(_sigmoid), score=_classification_score, label_cell=_scalar,
    prediction_cell=lambda item: float(item),
    agreement=lambda label, pred: ("correct", bool((pred > 0.5) == (label > 0.5))),
    explain_outputs=lambda prediction: prediction[:, None], default_target=_first_output,
    hard_label=_binary_hard_label, scores=_sigmoid, output_names=_probability_name, prior_offset=_binary_offset,
    nothing_found=lambda spec, spatial: 0))

register_kind(KindEntry(
    "multiclass", lambda spec, d: VectorHead(spec, d.dim), "vector", _CLASSIFICATION, "auc",
    per_sample=_vector_items(_softmax), score=_classification_score, label_cell=_scalar,
    prediction_cell=lambda item: int(item.argmax()),
    agreement=lambda label, pred: ("correct", bool(pred == int(label))),
    explain_outputs=lambda prediction: prediction, default_target=_argmax_output,
    hard_label=_class_index_label, scores=_softmax, min_outputs=2, prior_offset=_multiclass_offset))


def _multilabel_label_cell(value):
    return json.dumps([None if v != v else int(v) for v in torch.as_tensor(value).reshape(-1).tolist()])


register_kind(KindEntry(
    "multilabel", lambda spec, d: VectorHead(spec, d.dim), "vector", ("auc", "acc", "f1_macro"), "auc",
    per_sample=_vector_items(_sigmoid), score=_classification_score, label_cell=_multilabel_label_cell,
    prediction_cell=lambda item: json.dumps((item > 0.5).int().tolist()),
    agreement=lambda label, pred: ("correct", bool(pred == label)),
    explain_outputs=lambda prediction: prediction, default_target=_first_output,
    hard_label=lambda spec, item, logits: ((item > 0.5).float(), float(torch.maximum(item, 1 - item).min())),
    scores=_sigmoid))

register_kind(KindEntry(
    "ordinal", lambda spec, d: OrdinalHead(spec, d.dim), "vector", _CLASSIFICATION, "auc",
    per_sample=_vector_items(_ordinal), score=_classification_score, label_cell=_scalar,
    prediction_cell=lambda item: int(ordinal_rank(item)),
    agreement=lambda label, pred: ("correct", bool(pred == int(label))),
    explain_outputs=lambda prediction: prediction, default_target=_first_output,
    hard_label=_ordinal_hard_label, scores=_ordinal, min_outputs=2))


def _regression_label_cell(value):
    t = torch.as_tensor(value)
    return json.dumps(t.reshape(-1).tolist()) if t.numel() > 1 else _scalar(t)


def _numeric_error(label, pred):
    return None if isinstance(label, str) else ("error", float(abs(float(pred) - float(label))))


register_kind(KindEntry(
    "regression", lambda spec, d: VectorHead(spec, d.dim), "vector", (), "mae",
    per_sample=_vector_items(_values),
    score=lambda spec, labels, preds: regression_metrics(torch.stack([y.float().reshape(-1) for y in labels]).numpy(),
                                                         torch.stack(preds).numpy()),
    label_cell=_regression_label_cell,
    prediction_cell=lambda item: _scalar(item) if item.numel() == 1 else json.dumps(item.tolist()),
    agreement=_numeric_error, explain_outputs=lambda prediction: prediction, default_target=_first_output,
    hard_label=lambda spec, item, logits: (item.float().clone(), 1.0), scores=_values,
    losses=("", "huber", "mse", "l1"), higher_is_better=False,
    nothing_found=lambda spec, spatial: torch.zeros(spec.num_outputs)))  # a count of zero


def _segmentation_score(spec, labels, preds):
    dice = np.array([dice_per_class(p, y.long(), spec.num_outputs) for y, p in zip(labels, preds)])
    per_class = np.nanmean(dice, 0)
    return {"dice_per_class": per_class.tolist(), "dice": float(np.nanmean(per_class[1:]))}


def _segmentation_outputs(prediction):
    if len(prediction) != 1:
        raise UserError("segmentation outputs of several image groups cannot be explained together")
    ids, logits = prediction[0]
    return logits.flatten(2).mean(-1)[ids.argsort()]


def _segmentation_hard_label(spec, item, logits):
    probs = logits.float().softmax(0)
    return probs.argmax(0), float(probs.max(0).values.mean())


register_kind(KindEntry(
    "segmentation",
    lambda spec, d: SegmentationHead(spec, d.dim, d.in_chans, d.patch_sizes, d.seg_channels, d.num_features,
                                   d.seg_full_channels),
    "mask", ("dice",), "dice",
    per_sample=lambda prediction, n: [None if p is None else p.argmax(0).cpu()
                                      for p in SegmentationHead.per_sample(prediction, n)],
    score=_segmentation_score,
    label_cell=lambda value: float((torch.as_tensor(value) > 0).float().mean()),  # foreground fraction
    prediction_cell=lambda item: float((item > 0).float().mean()),
    agreement=lambda label, pred: ("error", float(abs(pred - label))),
    explain_outputs=_segmentation_outputs,
    default_target=lambda outputs: 1 if outputs.shape[1] > 1 else 0,  # the first foreground class
    hard_label=_segmentation_hard_label, min_outputs=2, queries_per_output=True,
    nothing_found=lambda spec, spatial: torch.zeros(spatial, dtype=torch.int64)))  # all background (class 0)


def _detection_items(prediction, num_samples):
    scores = prediction["logits"].sigmoid().float().cpu()
    return [None if b is None else (b.float().cpu(), s) for b, s in zip(prediction["boxes"], scores)]


def _box_count(value):
    t = torch.as_tensor(value)
    return int(t.reshape(-1, t.shape[-1]).shape[0]) if t.numel() else 0


def _detection_hard_label(spec, item, logits):
    boxes, scores = item
    sure = torch.maximum(scores, 1 - scores)
    return boxes[scores >= 0.5].float().clone(), float(sure.min()) if len(sure) else 1.0


register_kind(KindEntry(
    "detection", lambda spec, d: DetectionHead(spec, d.dim), "boxes", ("mean_iou", "map@0.25", "map@0.5", "map@0.75"),
    "map@0.5", per_sample=_detection_items,
    score=lambda spec, labels, preds: detection_metrics(
        preds, [y.float().reshape(-1, p[0].shape[-1]) for y, p in zip(labels, preds)]),
    label_cell=_box_count, prediction_cell=lambda item: int((item[1] > 0.5).sum()),
    agreement=_numeric_error, explain_outputs=lambda prediction: prediction["logits"], default_target=_argmax_output,
    hard_label=_detection_hard_label, queries_per_output=True,
    nothing_found=lambda spec, spatial: torch.zeros(0, 2 * len(spatial))))
