"""Domain-aware batching and the two views of multi-annotation data."""
from __future__ import annotations

from collections import Counter
from typing import Hashable, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .sample import Sample

__all__ = ["WeightedBatchSampler", "balanced_weights", "MixedDataset", "PerAnnotationView", "labels_of"]


def labels_of(dataset: Dataset, i: int) -> dict:
    """Sample ``i``'s labels, without reading its image when the dataset offers ``labels_of``."""
    fast = getattr(dataset, "labels_of", None)
    return fast(i) if fast is not None else dataset[i].labels


def balanced_weights(keys: Sequence[Hashable], key_weights: dict | None = None) -> torch.Tensor:
    """Per-sample weights so that each key (dataset, domain, class...) is drawn with its weight.

    With no ``key_weights`` every key is equally likely. Keys missing from ``key_weights`` get 0.
    """
    counts = Counter(keys)
    if key_weights is None:
        key_weights = {k: 1.0 for k in counts}
    unknown = set(key_weights) - set(counts)
    if unknown:
        raise UserError(f"balanced_weights: weights given for absent key(s) {sorted(map(str, unknown))}")
    w = torch.tensor([key_weights.get(k, 0.0) / counts[k] for k in keys], dtype=torch.float64)
    if not w.sum() > 0:
        raise UserError("balanced_weights: all weights are zero")
    return w / w.sum()


class WeightedBatchSampler(torch.utils.data.Sampler):
    """Batches of indices drawn by weight (with replacement), reproducible per ``(seed, epoch)``.

    ``weights=None`` gives a plain shuffle without replacement. Under DDP each rank takes its own
    contiguous share of every global batch (``rank``/``world_size``).
    """

    def __init__(self, num_samples: int, batch_size: int, weights: torch.Tensor | None = None,
                 num_batches: int | None = None, seed: int = 0, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise UserError("WeightedBatchSampler: the dataset is empty")
        if batch_size < 1 or batch_size % world_size:
            raise UserError(f"batch_size {batch_size} must be positive and divisible by world_size {world_size}")
        if weights is not None and len(weights) != num_samples:
            raise UserError(f"WeightedBatchSampler: {len(weights)} weights for {num_samples} samples")
        self.num_samples, self.batch_size, self.weights = num_samples, batch_size, weights
        full = num_samples // batch_size if drop_last else -(-num_samples // batch_size)
        self.num_batches = num_batches or max(1, full)
        self.seed, self.epoch, self.skip_batches = seed, 0, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def global_batches(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        total = self.num_batches * self.batch_size
        if self.weights is None:
            reps = -(-total // self.num_samples)
            order = torch.cat([torch.randperm(self.num_samples, generator=g) for _ in range(reps)])[:total]
            return list(order.split(self.batch_size))
        order = torch.multinomial(self.weights, total, replacement=True, generator=g)
        return list(order.split(self.batch_size))

    def __iter__(self):
        share = self.batch_size // self.world_size
        for batch in self.global_batches()[self.skip_batches:]:
            yield batch[self.rank * share:(self.rank + 1) * share].tolist()

    def __len__(self) -> int:
        return self.num_batches - self.skip_batches


class MixedDataset(Dataset):
    """Several datasets as one; ``source_of(i)`` names the dataset of sample ``i`` (for weights)."""

    def __init__(self, datasets: dict[str, Dataset]):
        if not datasets:
            raise UserError("MixedDataset: no datasets")
        empty = [name for name, d in datasets.items() if len(d) == 0]
        if empty:
            raise UserError(f"MixedDataset: empty dataset(s) {empty}")
        self.datasets = dict(datasets)
        self.names = list(datasets)
        self.offsets = torch.tensor([0] + [len(d) for d in datasets.values()]).cumsum(0)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[str, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        d = int(torch.searchsorted(self.offsets, torch.tensor(i), right=True)) - 1
        return self.names[d], i - int(self.offsets[d])

    def source_of(self, i: int) -> str:
        return self.locate(i)[0]

    def labels_of(self, i: int) -> dict:
        name, j = self.locate(i)
        return labels_of(self.datasets[name], j)

    def __getitem__(self, i: int) -> Sample:
        name, j = self.locate(i)
        return self.datasets[name][j]


class ImageCentricView(Dataset):
    """Every image of a multi-annotation dataset with all of its annotations among ``tasks`` (others dropped).

    The image-centric counterpart of :class:`PerAnnotationView` over the same tasks.
    """

    def __init__(self, dataset: Dataset, tasks: Sequence[str]):
        self.dataset, self.tasks = dataset, list(tasks)
        self.index = [i for i in range(len(dataset)) if any(t in labels_of(dataset, i) for t in self.tasks)]
        if not self.index:
            raise UserError(f"ImageCentricView: no sample carries any of the tasks {self.tasks}")

    def __len__(self) -> int:
        return len(self.index)

    def labels_of(self, k: int) -> dict:
        labels = labels_of(self.dataset, self.index[k])
        return {t: labels[t] for t in self.tasks if t in labels}

    def __getitem__(self, k: int) -> Sample:
        s = self.dataset[self.index[k]]
        return Sample(s.image, s.domain, {t: s.labels[t] for t in self.tasks if t in s.labels}, s.spacing,
                      s.patient_id, dict(s.meta))


class PerAnnotationView(Dataset):
    """Each (image, annotation) pair of a multi-annotation dataset as its own sample: every label is kept,
    each image repeated once per annotation, as if each task's annotations came from a separate dataset.

    (``data.annotations=decentralized`` is another variant: each image keeps only ONE of its
    annotations; see :func:`~medexplore.data.annotations.select_annotations`.)
    """

    def __init__(self, dataset: Dataset, tasks: Sequence[str]):
        self.dataset, self.tasks = dataset, list(tasks)
        self.pairs = [(i, t) for i in range(len(dataset)) for t in self.tasks if t in labels_of(dataset, i)]
        if not self.pairs:
            raise UserError(f"PerAnnotationView: no sample carries any of the tasks {self.tasks}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> Sample:
        i, task = self.pairs[k]
        s = self.dataset[i]
        return Sample(s.image, s.domain, {task: s.labels[task]}, s.spacing, s.patient_id, dict(s.meta))
