"""Run a model over a dataset and score every task with the metrics of its kind."""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.sample import collate
from ..models.heads import SegmentationHead
from ..models.medformer import Medformer
from ..models.tasks import TaskKind
from .metrics import classification_metrics, detection_metrics, dice_per_class, ordinal_probabilities, regression_metrics

__all__ = ["evaluate", "collect_predictions", "per_sample_predictions", "task_scores", "score_task"]


def task_scores(kind: TaskKind, prediction: torch.Tensor) -> torch.Tensor:
    """Probabilities (classification) or values (regression) from a vector head's raw output."""
    if kind in (TaskKind.BINARY, TaskKind.MULTILABEL):
        return prediction.float().sigmoid()
    if kind == TaskKind.MULTICLASS:
        return prediction.float().softmax(-1)
    if kind == TaskKind.ORDINAL:
        return ordinal_probabilities(prediction.float())
    return prediction.float()


def per_sample_predictions(kind: TaskKind, prediction, num_samples: int) -> list:
    """One task's raw head output as one plain item per sample (``None`` where it produced nothing).

    Vector kinds: probabilities (values for regression); segmentation: an integer mask;
    detection: ``(boxes (K, 2d) in pixels, scores (K,))``.
    """
    if kind == TaskKind.SEGMENTATION:
        return [None if p is None else p.argmax(0).cpu() for p in SegmentationHead.per_sample(prediction, num_samples)]
    if kind == TaskKind.DETECTION:
        scores = prediction["logits"].sigmoid().float().cpu()
        return [None if b is None else (b.float().cpu(), s) for b, s in zip(prediction["boxes"], scores)]
    return list(task_scores(kind, prediction).cpu())


@torch.no_grad()
def collect_predictions(model: Medformer, dataset: Dataset, batch_size: int = 256, device="cpu",
                        num_workers: int = 0, autocast: Callable | None = None) -> dict[str, list]:
    """Per task, the (label, prediction) pair of every sample of ``dataset`` carrying that label.

    (Embeddings with per-sample metadata: :func:`medexplore.analysis.compute_embeddings`.)
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    model.eval()
    pairs: dict[str, list] = {name: [] for name in model.tasks}
    for batch in loader:
        batch = batch.to(device)
        with (autocast() if autocast is not None else contextlib.nullcontext()):
            out = model(batch)
        for name, spec in model.tasks.items():
            labels = batch.targets.get(name)
            if labels is None:
                continue
            items = per_sample_predictions(spec.kind, out.predictions[name], batch.num_samples)
            for y, p in zip(labels, items):
                if y is not None and p is not None:
                    pairs[name].append((torch.as_tensor(y).cpu(), p))
    return pairs


def evaluate(model: Medformer, dataset: Dataset, batch_size: int = 256, device="cpu", num_workers: int = 0,
             autocast: Callable | None = None) -> dict[str, dict]:
    """Metrics per task name (tasks without any label in ``dataset`` are left out)."""
    pairs = collect_predictions(model, dataset, batch_size, device, num_workers, autocast)
    return {name: score_task(model.tasks[name], items) for name, items in pairs.items() if items}


def score_task(spec, items: list) -> dict:
    """The metrics of ``spec``'s kind over ``(label, prediction)`` pairs (as :func:`collect_predictions` gives)."""
    labels = [y for y, _ in items]
    preds = [p for _, p in items]
    if spec.kind == TaskKind.SEGMENTATION:
        dice = np.array([dice_per_class(p, y.long(), spec.num_outputs) for y, p in zip(labels, preds)])
        per_class = np.nanmean(dice, 0)
        result = {"dice_per_class": per_class.tolist(), "dice": float(np.nanmean(per_class[1:]))}
    elif spec.kind == TaskKind.DETECTION:
        result = detection_metrics(preds, [y.float().reshape(-1, p[0].shape[-1]) for y, p in zip(labels, preds)])
    elif spec.kind == TaskKind.REGRESSION:
        result = regression_metrics(torch.stack([y.float().reshape(-1) for y in labels]).numpy(),
                                    torch.stack(preds).numpy())
    else:
        y = torch.stack([y.float().reshape(-1) for y in labels]).numpy()
        result = classification_metrics(spec.kind.value, y, torch.stack(preds).numpy())
    result["n"] = len(items)
    return result
