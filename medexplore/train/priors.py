"""Keep a model's probabilities those of the data when the sampler changes how often each class is seen.

A sampler that balances classes (``train.balance: label`` or ``source_label``) shows the rare class more
often: that is the point, it gets more of the gradient. Trained on those batches as they are, the model
learns the sampled class shares and its probabilities (and any accuracy at 0.5) are off on real data.
Logit adjustment undoes that: the loss sees ``raw output + offset``, where the offset is what the sampled
shares add to each class's logit over the data's (the kind's ``prior_offset``), so the raw output the model
keeps for inference estimates the data's posterior. Nothing changes at inference.

Example:
    >>> import torch
    >>> from medexplore.models.kinds import kind_entry
    >>> offset = kind_entry("binary").prior_offset(torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5]))
    >>> round(float(offset), 3)  # log 9: the positive logit the balanced batches add
    2.197
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data.sampling import labels_of
from ..errors import UserError
from ..models.kinds import kind_entry
from ..models.tasks import TaskSpec
from .builders import balanced_tasks

__all__ = ["class_shares", "prior_offsets"]

NEGLIGIBLE = 1e-6  # offsets smaller than this (a sampler that leaves class shares alone) are left out


def class_shares(tasks: dict[str, TaskSpec], dataset: Dataset, weights: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per class task (a kind with a ``prior_offset``): each class's share of the labelled training samples,
    and of the sampler's draws (``weights``: one sampling weight per sample of ``dataset``)."""
    if len(weights) != len(dataset):
        raise UserError(f"class_shares: {len(weights)} sampling weights for {len(dataset)} samples")
    classes = {name: max(2, tasks[name].num_outputs) for name in balanced_tasks(tasks)}
    counts = {name: torch.zeros(k, dtype=torch.float64) for name, k in classes.items()}
    mass = {name: torch.zeros(k, dtype=torch.float64) for name, k in classes.items()}
    for i in range(len(dataset)):
        for name, value in labels_of(dataset, i).items():
            if name not in classes or value is None:
                continue
            c = int(torch.as_tensor(value).reshape(-1)[0])
            if not 0 <= c < classes[name]:
                raise UserError(f"task {name!r}, training sample {i}: class {c} is outside 0..{classes[name] - 1}")
            counts[name][c] += 1
            mass[name][c] += float(weights[i])
    return {name: (counts[name] / counts[name].sum(), mass[name] / mass[name].sum())
            for name in classes if counts[name].sum() > 0 and mass[name].sum() > 0}


def prior_offsets(tasks: dict[str, TaskSpec], dataset: Dataset, weights: Tensor | None) -> dict[str, Tensor]:
    """Per class task whose class shares the sampler changes, the offset its loss adds to the raw output
    (float32); empty when ``weights`` is None (a plain shuffle) or changes no task's shares."""
    if weights is None:
        return {}
    out = {}
    for name, (data, sampled) in class_shares(tasks, dataset, weights).items():
        offset = kind_entry(tasks[name].kind).prior_offset(data, sampled).float()
        if offset.abs().max() > NEGLIGIBLE:
            out[name] = offset
    return out
