"""Per-sample predictions of every task as NumPy arrays, for figures, napari layers and notebooks."""
from __future__ import annotations

from typing import Sequence

import torch

from ..data.sample import Sample, collate
from ..models.heads import SegmentationHead
from ..models.medformer import Medformer
from ..models.tasks import TaskKind
from ..train.evaluate import task_scores

__all__ = ["predict_samples"]


@torch.no_grad()
def predict_samples(model: Medformer, samples: Sequence[Sample], device="cpu") -> list[dict]:
    """For each sample: ``image`` (C, *spatial), ``labels`` (as given) and ``predictions`` per task.

    Segmentation gives an integer mask, detection ``boxes`` (K, 2d) in pixels with ``scores`` (K,),
    the other kinds probabilities (or values for regression).
    """
    if not samples:
        return []
    model.eval()
    batch = collate(list(samples)).to(device)
    out = model(batch)
    results = [{"image": s.image.numpy(), "domain": s.domain, "labels": s.labels, "predictions": {},
                "embedding": out.embedding[i].float().cpu().numpy()} for i, s in enumerate(samples)]
    for name, spec in model.tasks.items():
        pred = out.predictions[name]
        if spec.kind == TaskKind.SEGMENTATION:
            for i, logits in enumerate(SegmentationHead.per_sample(pred, len(samples))):
                if logits is not None:
                    results[i]["predictions"][name] = logits.argmax(0).cpu().numpy()
        elif spec.kind == TaskKind.DETECTION:
            scores = pred["logits"].sigmoid().float().cpu().numpy()
            for i, boxes in enumerate(pred["boxes"]):
                if boxes is not None:
                    results[i]["predictions"][name] = {"boxes": boxes.float().cpu().numpy(), "scores": scores[i]}
        else:
            values = task_scores(spec.kind, pred).cpu().numpy()
            for i in range(len(samples)):
                if spec.applies_to(samples[i].domain):
                    results[i]["predictions"][name] = values[i]
    return results
