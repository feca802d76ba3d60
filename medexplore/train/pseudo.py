"""Pseudo-labelling (IMAX's three stages: train on decentralized annotations, label what each
training image lacks, retrain on the now image-centric data).

A model's prediction becomes a pseudo-label when it is confident: classification by its top
probability (every output, for multi-label), segmentation by the mean top probability over the
voxels, detection by how sure every candidate box is (kept or rejected at score 0.5). Regression has
no confidence and is always kept.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.annotations import AnnotationView, pseudo_label_key, save_pseudo_labels
from ..data.registry import build_dataset, dataset_parts
from ..data.sample import collate
from ..errors import UserError
from ..models.heads import SegmentationHead
from ..models.kinds import kind_entry, per_sample_predictions, score_task
from ..models.medformer import Medformer
from ..models.tasks import TaskSpec

__all__ = ["PseudoLabels", "pseudo_label", "hard_label"]


@dataclass
class PseudoLabels:
    """Pseudo-labels by :func:`~medexplore.data.annotations.pseudo_label_key`, and per task their
    ``quality``: ``missing`` annotations, ``kept`` after the filter, ``coverage`` (kept / missing) and the
    task's metrics of the kept predictions against the true labels (where the dataset has them)."""

    labels: dict[str, object]
    quality: dict[str, dict]

    def save(self, path: str | Path) -> Path:
        save_pseudo_labels(path, self.labels)
        return Path(path)


def hard_label(spec: TaskSpec, item, logits: torch.Tensor | None = None) -> tuple[object, float]:
    """A prediction as a label of the dataset's format, and the confidence the filter compares.

    ``item``: the task's per-sample prediction (:func:`~medexplore.train.evaluate.per_sample_predictions`);
    ``logits``: the raw ``(C, *spatial)`` map for segmentation.
    """
    return kind_entry(spec.kind).hard_label(spec, item, logits)


@torch.no_grad()
def pseudo_label(model: Medformer, data: dict, threshold: float = 0.9, batch_size: int = 64,
                 device="cpu") -> PseudoLabels:
    """Label every annotation the training images of ``data`` (a data section, e.g. with
    ``annotations: decentralized``) lack, keeping predictions with confidence >= ``threshold``."""
    if not 0 <= threshold <= 1:
        raise UserError(f"pseudo-label threshold must be in [0, 1], got {threshold}")
    data = {**copy.deepcopy(data), "pseudo_labels": None}
    names = list(data["datasets"])
    model.eval().to(device)
    labels: dict[str, object] = {}
    pairs: dict[str, list] = {t: [] for t in model.tasks}
    missing = dict.fromkeys(model.tasks, 0)
    for name, part in zip(names, dataset_parts(build_dataset(data, "train"))):
        view = part if isinstance(part, AnnotationView) else AnnotationView(part, range(len(part)), [None] * len(part))
        for start in range(0, len(view), batch_size):
            positions = range(start, min(start + batch_size, len(view)))
            samples = [view.dataset[view.index[k]] for k in positions]
            out = model(collate(samples).to(device))
            for task, spec in model.tasks.items():
                items = per_sample_predictions(spec.kind, out.predictions[task], len(samples))
                logits = (SegmentationHead.per_sample(out.predictions[task], len(samples))
                          if kind_entry(spec.kind).output == "mask" else [None] * len(samples))
                for k, sample, item, raw in zip(positions, samples, items, logits):
                    if item is None or not spec.applies_to(sample.domain) or task in view.labels_of(k):
                        continue
                    missing[task] += 1
                    label, confidence = hard_label(spec, item, raw)
                    if confidence < threshold:
                        continue
                    labels[pseudo_label_key(name, view.index[k], task)] = label
                    truth = sample.labels.get(task)
                    if truth is not None:
                        pairs[task].append((torch.as_tensor(truth), item))
    quality = {}
    for task, n in missing.items():
        if not n:
            continue
        kept = sum(1 for key in labels if key.endswith(f"/{task}"))
        quality[task] = {"missing": n, "kept": kept, "coverage": kept / n}
        if pairs[task]:
            try:
                quality[task].update(score_task(model.tasks[task], pairs[task]))
            except ValueError:  # e.g. AUC of kept labels that are all one class
                pass
    return PseudoLabels(labels, quality)
