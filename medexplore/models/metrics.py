"""Metrics per task kind. AUC and ACC follow the MedMNIST evaluator exactly."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .boxes import box_iou

__all__ = ["roc_auc", "classification_metrics", "dice_per_class", "detection_metrics", "regression_metrics",
           "ordinal_probabilities", "ordinal_rank"]


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN if one class is absent."""
    y_true = np.asarray(y_true).astype(bool).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(score)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ordinal_probabilities(cumulative_logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities from CORAL logits: P(y = k) = P(y > k - 1) - P(y > k)."""
    p = cumulative_logits.sigmoid()
    ones, zeros = torch.ones_like(p[:, :1]), torch.zeros_like(p[:, :1])
    upper = torch.cat([ones, p], 1)
    lower = torch.cat([p, zeros], 1)
    return (upper - lower).clamp(min=0)


def ordinal_rank(probabilities):
    """CORAL's predicted grade from class probabilities (NumPy or torch, classes last): the number of
    thresholds ``k`` with ``P(y > k) > 0.5``. The argmax of the class probabilities is not the ordinal
    prediction: for an uncertain grade it favours the extreme classes (on RetinaMNIST it never chose a
    middle grade)."""
    above = 1 - probabilities.cumsum(-1)[..., :-1]  # P(y > k), k = 0 .. K-2
    return (above > 0.5).sum(-1)


def _recall_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    recall, f1 = [], []
    for c in range(num_classes):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        recall.append(tp / (tp + fn) if tp + fn else float("nan"))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"))
    return {"recall_per_class": recall, "f1_per_class": f1,
            "balanced_acc": float(np.nanmean(recall)), "f1_macro": float(np.nanmean(f1))}


def classification_metrics(kind: str, y_true: np.ndarray, score: np.ndarray) -> dict:
    """MedMNIST AUC/ACC plus per-class recall, F1 and expected calibration error.

    ``score``: binary, (N,) or (N, 2) probability of the positive class; multiclass/ordinal,
    (N, C) class probabilities; multilabel, (N, L) label probabilities.
    """
    y_true = np.asarray(y_true)
    score = np.asarray(score, dtype=np.float64)
    if len(y_true) == 0:
        raise UserError("classification_metrics: no samples")
    if kind == "binary":
        pos = score[:, -1] if score.ndim == 2 else score
        y = y_true.ravel().astype(int)
        pred = (pos > 0.5).astype(int)
        out = {"auc": roc_auc(y, pos), "acc": float((pred == y).mean())}
        out.update(_recall_f1(y, pred, 2))
        out["ece"] = _ece(np.where(pred == 1, pos, 1 - pos), pred == y)
        return out
    if kind == "multilabel":
        y = y_true.reshape(score.shape).astype(int)
        aucs = [roc_auc(y[:, i], score[:, i]) for i in range(score.shape[1])]
        pred = (score > 0.5).astype(int)
        per_label_acc = (pred == y).mean(0)
        tp, fp, fn = (pred & y).sum(0), (pred & (1 - y)).sum(0), ((1 - pred) & y).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall, f1 = tp / (tp + fn), 2 * tp / (2 * tp + fp + fn)
        return {"auc": float(np.nanmean(aucs)), "acc": float(per_label_acc.mean()), "auc_per_label": aucs,
                "recall_per_class": recall.tolist(), "f1_per_class": f1.tolist(), "f1_macro": float(np.nanmean(f1))}
    if kind in ("multiclass", "ordinal"):
        y = y_true.ravel().astype(int)
        aucs = [roc_auc(y == c, score[:, c]) for c in range(score.shape[1])]
        pred = ordinal_rank(score) if kind == "ordinal" else score.argmax(1)
        out = {"auc": float(np.nanmean(aucs)), "acc": float((pred == y).mean())}
        out.update(_recall_f1(y, pred, score.shape[1]))
        out["ece"] = _ece(score[np.arange(len(pred)), pred], pred == y)
        if kind == "ordinal":  # acc scores the grade the head predicts; acc_argmax the MedMNIST evaluator's rule
            out["acc_argmax"] = float((score.argmax(1) == y).mean())
            out["mae_grade"] = float(np.abs(pred - y).mean())
        return out
    raise UserError(f"classification_metrics: kind {kind!r} is not a classification kind")


def _ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-width confidence bins."""
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (confidence > lo) & (confidence <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - confidence[m].mean())
    return float(total)


def regression_metrics(y_true: np.ndarray, pred: np.ndarray) -> dict:
    y_true, pred = np.asarray(y_true, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    known = ~np.isnan(y_true)
    err = np.abs(pred - y_true)
    return {"mae": float(err[known].mean()), "mae_per_output": [float(e[k].mean()) if k.any() else float("nan")
                                                                for e, k in zip(err.T, known.T)]}


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of each class between two integer masks of the same shape (NaN where both are empty)."""
    if pred.shape != target.shape:
        raise UserError(f"dice_per_class: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    out = []
    for c in range(num_classes):
        p, t = pred == c, target == c
        denom = int(p.sum() + t.sum())
        out.append(2 * int((p & t).sum()) / denom if denom else float("nan"))
    return out


def detection_metrics(predictions: list[tuple[torch.Tensor, torch.Tensor]], targets: list[torch.Tensor],
                      thresholds=(0.25, 0.5, 0.75)) -> dict:
    """mAP at each IoU threshold (all-point interpolated AP) and mean IoU of each target's best box.

    ``predictions``: per image ``(boxes (K, 2d), scores (K,))``; ``targets``: per image ``(M, 2d)``.
    """
    if len(predictions) != len(targets):
        raise UserError(f"detection_metrics: {len(predictions)} predictions for {len(targets)} targets")
    n_targets = sum(len(t) for t in targets)
    best_ious = []
    for (boxes, _), t in zip(predictions, targets):
        if len(t) and len(boxes):
            best_ious.extend(box_iou(t.float(), boxes.float()).max(1).values.tolist())
        elif len(t):
            best_ious.extend([0.0] * len(t))
    out = {"mean_iou": float(np.mean(best_ious)) if best_ious else float("nan")}
    for thr in thresholds:
        scored = []  # (score, is_true_positive)
        for (boxes, scores), t in zip(predictions, targets):
            order = scores.argsort(descending=True)
            taken = torch.zeros(len(t), dtype=torch.bool)
            ious = box_iou(boxes[order].float(), t.float()) if len(t) else None
            for rank, k in enumerate(order.tolist()):
                hit = False
                if ious is not None:
                    cand = ious[rank].masked_fill(taken, -1)
                    j = int(cand.argmax())
                    if cand[j] >= thr:
                        taken[j], hit = True, True
                scored.append((float(scores[k]), hit))
        out[f"map@{thr:g}"] = _average_precision(scored, n_targets)
    return out


def _average_precision(scored: list[tuple[float, bool]], n_targets: int) -> float:
    if n_targets == 0:
        return float("nan")
    scored.sort(key=lambda s: -s[0])
    hits = np.array([h for _, h in scored], dtype=float)
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / n_targets
    # all-point interpolation: precision envelope, summed over recall steps
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    prev_recall = np.concatenate([[0.0], recall[:-1]])
    return float(((recall - prev_recall) * envelope).sum())
