"""Run a model over a dataset and score every task with the metrics of its kind."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.registry import dataset_parts
from ..data.sample import collate
from ..models.kinds import KINDS, per_sample_predictions, score_task
from ..models.medformer import Medformer
from ..models.packing import Batch

__all__ = ["evaluate", "collect_predictions", "flip_averaged", "capped_batch_size"]


MAX_EVAL_VOXELS = 64 * 64 ** 3  # per evaluation batch: 64 volumes of 64^3 (256 of 28^3 fit well within)


def capped_batch_size(dataset: Dataset, batch_size: int) -> int:
    """``batch_size``, lowered so that a batch of the largest first image among the dataset's parts holds
    at most :data:`MAX_EVAL_VOXELS` pixels (large volumes' convolutions otherwise need gigabytes)."""
    voxels = max((part[0].image[0].numel() for part in dataset_parts(dataset) if len(part)), default=1)
    return max(1, min(batch_size, MAX_EVAL_VOXELS // voxels))


def flip_averaged(model: Medformer, batch: Batch) -> dict:
    """The model's raw predictions on ``batch``, image-level outputs (kinds whose output is a vector)
    averaged with those of the left-right mirrored images (the flip training augmentation applies);
    masks and boxes come from the images as given."""
    predictions = dict(model(batch).predictions)
    mirrored = model(dataclasses.replace(batch, groups=[g.flip(-1) for g in batch.groups])).predictions
    for name, spec in model.tasks.items():
        if KINDS[spec.kind].output == "vector" and isinstance(predictions.get(name), torch.Tensor):
            predictions[name] = (predictions[name] + mirrored[name]) / 2
    return predictions


@torch.no_grad()
def collect_predictions(model: Medformer, dataset: Dataset, batch_size: int = 256, device="cpu",
                        num_workers: int = 0, autocast: Callable | None = None,
                        flips: bool = False) -> dict[str, list]:
    """Per task, the (label, prediction) pair of every sample of ``dataset`` carrying that label.
    ``flips``: image-level predictions averaged over each image and its mirror (:func:`flip_averaged`).

    (Embeddings with per-sample metadata: :func:`medexplore.analysis.compute_embeddings`.)
    """
    loader = DataLoader(dataset, batch_size=capped_batch_size(dataset, batch_size), shuffle=False, collate_fn=collate,
                        num_workers=num_workers)
    model.eval()
    pairs: dict[str, list] = {name: [] for name in model.tasks}
    for batch in loader:
        batch = batch.to(device)
        with (autocast() if autocast is not None else contextlib.nullcontext()):
            predictions = flip_averaged(model, batch) if flips else model(batch).predictions
        for name, spec in model.tasks.items():
            labels = batch.targets.get(name)
            if labels is None:
                continue
            items = per_sample_predictions(spec.kind, predictions[name], batch.num_samples)
            for y, p in zip(labels, items):
                if y is not None and p is not None:
                    pairs[name].append((torch.as_tensor(y).cpu(), p))
    return pairs


def evaluate(model: Medformer, dataset: Dataset, batch_size: int = 256, device="cpu", num_workers: int = 0,
             autocast: Callable | None = None, flips: bool = False) -> dict[str, dict]:
    """Metrics per task name (tasks without any label in ``dataset`` are left out); ``flips``: test-time
    flip averaging of image-level predictions (:func:`flip_averaged`)."""
    pairs = collect_predictions(model, dataset, batch_size, device, num_workers, autocast, flips)
    return {name: score_task(model.tasks[name], items) for name, items in pairs.items() if items}
