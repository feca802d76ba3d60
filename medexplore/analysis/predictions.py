"""Per-sample predictions of every task as NumPy arrays, for figures, napari layers and notebooks."""
from __future__ import annotations

from typing import Sequence

import torch

from ..data.sample import Sample, collate
from ..models.kinds import kind_entry, per_sample_predictions
from ..models.medformer import Medformer

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
        items = per_sample_predictions(spec.kind, out.predictions[name], len(samples))
        for result, sample, item in zip(results, samples, items):
            if item is None or not spec.applies_to(sample.domain):
                continue
            if kind_entry(spec.kind).output == "boxes":
                result["predictions"][name] = {"boxes": item[0].numpy(), "scores": item[1].numpy()}
            else:
                result["predictions"][name] = item.numpy()
    return results
