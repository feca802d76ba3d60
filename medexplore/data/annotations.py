"""Which annotations a training set keeps: a fraction of its images, image-centric against
decentralized annotation (IMAX), and pseudo-labels filling the annotations left out.

``data.label_fraction``, ``data.annotations`` and ``data.pseudo_labels`` in a config select them;
:func:`medexplore.data.registry.build_dataset` applies them to the training split only, so validation
and test scores stay comparable across the variants.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..models.kinds import kind_entry
from ..models.tasks import TaskSpec
from .sample import Sample
from .sampling import labels_of

__all__ = ["ANNOTATION_MODES", "AnnotationView", "NothingFoundView", "select_annotations", "keep_tasks",
           "pseudo_label_key", "save_pseudo_labels",
           "load_pseudo_labels"]

ANNOTATION_MODES = ("full", "image-centric", "decentralized")


class _View(Dataset):
    """A dataset seen with other images or labels: the domains and the check are the wrapped dataset's."""

    def __init__(self, dataset: Dataset, tasks: Iterable[TaskSpec]):
        self.dataset, self.tasks = dataset, tuple(tasks)
        self.domains = getattr(dataset, "domains", ())

    def check(self) -> None:
        """The underlying dataset's own check (e.g. a folder's headers), where it has one."""
        if hasattr(self.dataset, "check"):
            self.dataset.check()


class AnnotationView(_View):
    """Chosen images of ``dataset`` (``index``), each keeping the annotations named in ``keep``, plus
    ``extra`` labels (e.g. pseudo-labels, by position in the view) where the image has none of its own."""

    def __init__(self, dataset: Dataset, index: Sequence[int], keep: Sequence[frozenset[str] | None],
                 extra: Mapping[int, dict] | None = None, tasks: Sequence[str] | None = None):
        if len(index) != len(keep):
            raise UserError(f"AnnotationView: {len(index)} images but {len(keep)} annotation sets")
        if not index:
            raise UserError("AnnotationView: no image selected")
        super().__init__(dataset, (t for t in getattr(dataset, "tasks", ()) if tasks is None or t.name in tasks))
        self.index, self.keep = list(index), list(keep)
        self.extra = {int(k): dict(v) for k, v in (extra or {}).items()}

    def __len__(self) -> int:
        return len(self.index)

    def _select(self, k: int, labels: dict) -> dict:
        kept = {t: y for t, y in labels.items() if self.keep[k] is None or t in self.keep[k]}
        return {**self.extra.get(k, {}), **kept}  # an image's own annotation wins over a pseudo-label

    def labels_of(self, k: int) -> dict:
        return self._select(k, labels_of(self.dataset, self.index[k]))

    def __getitem__(self, k: int) -> Sample:
        s = self.dataset[self.index[k]]
        return Sample(s.image, s.domain, self._select(k, s.labels), s.spacing, s.patient_id, dict(s.meta))


class NothingFoundView(_View):
    """``dataset`` with every image labelled as showing none of ``tasks``' findings (the kinds' ``nothing_found``
    label: no lesion, a count of 0, no boxes, an all-background mask) where it has no label of its own: e.g.
    real images as negatives for synthetic-lesion tasks taught on other data."""

    def __init__(self, dataset: Dataset, tasks: Sequence[TaskSpec]):
        for spec in tasks:
            if kind_entry(spec.kind).nothing_found is None:
                raise UserError(f"task {spec.name!r}: kind '{spec.kind}' has no 'nothing found' label")
        own = tuple(getattr(dataset, "tasks", ()))
        super().__init__(dataset, own + tuple(t for t in tasks if t.name not in {o.name for o in own}))
        self.absent = tuple(tasks)

    def __len__(self) -> int:
        return len(self.dataset)

    def _with_absent(self, labels: dict, spatial: Callable[[], tuple[int, ...]]) -> dict:
        missing = [t for t in self.absent if t.name not in labels]
        if not missing:
            return labels
        shape = spatial()  # only when a label is added: ``labels_of`` reads the image for it
        return {**labels, **{t.name: kind_entry(t.kind).nothing_found(t, shape) for t in missing}}

    def labels_of(self, i: int) -> dict:
        return self._with_absent(labels_of(self.dataset, i), lambda: tuple(self.dataset[i].image.shape[1:]))

    def __getitem__(self, i: int) -> Sample:
        s = self.dataset[i]
        labels = self._with_absent(s.labels, lambda: tuple(s.image.shape[1:]))
        return Sample(s.image, s.domain, labels, s.spacing, s.patient_id, dict(s.meta))


def _subset(n: int, fraction: float, generator: torch.Generator) -> list[int]:
    keep = max(1, round(fraction * n))
    return sorted(torch.randperm(n, generator=generator)[:keep].tolist())


def select_annotations(dataset: Dataset, annotations: str = "full", label_fraction: float = 1.0, seed: int = 0,
                       extra: Mapping[int, dict] | None = None) -> Dataset:
    """The training images and annotations a variant keeps (``dataset`` itself when it keeps everything).

    ``label_fraction``: a seeded random share of the images (at least one). ``annotations``:

    - ``full``: every annotation of every image;
    - ``decentralized``: every image keeps ONE of its annotations, the tasks taken in turn within each
      group of images annotated for the same tasks, as if each task's labels came from its own dataset;
    - ``image-centric``: the images whose turn is the group's first task keep ALL their annotations.

    The two give every task the same number of labels (within one per group) and the same total, from
    the same pool of images: image-centric concentrates them on 1/T of the images. ``extra``: labels by
    image index of ``dataset`` (pseudo-labels) added where an image kept no annotation of that task.
    """
    if annotations not in ANNOTATION_MODES:
        raise UserError(f"data.annotations must be one of {ANNOTATION_MODES}, got {annotations!r}")
    if not (0 < label_fraction <= 1 and math.isfinite(label_fraction)):
        raise UserError(f"data.label_fraction must be in (0, 1], got {label_fraction}")
    if annotations == "full" and label_fraction == 1 and not extra:
        return dataset
    g = torch.Generator().manual_seed(seed)
    images = _subset(len(dataset), label_fraction, g) if label_fraction < 1 else list(range(len(dataset)))
    tasks_of = {i: tuple(sorted(labels_of(dataset, i))) for i in images}
    turn, seen = {}, Counter()
    for position in torch.randperm(len(images), generator=g).tolist():
        i = images[position]
        turn[i] = seen[tasks_of[i]] % max(1, len(tasks_of[i]))
        seen[tasks_of[i]] += 1
    if annotations == "decentralized":
        keep = {i: frozenset(tasks_of[i][turn[i]:turn[i] + 1]) for i in images}
    elif annotations == "image-centric":
        images = [i for i in images if turn[i] == 0]
        keep = {i: None for i in images}
    else:
        keep = {i: None for i in images}
    extra = extra or {}
    return AnnotationView(dataset, images, [keep[i] for i in images],
                          {k: extra[i] for k, i in enumerate(images) if i in extra})


def keep_tasks(dataset: Dataset, names: Sequence[str]) -> Dataset | None:
    """Only the annotations of the tasks ``names`` (images with none of them left out): a model built on
    it has those heads only. None when ``dataset`` carries none of the tasks."""
    carried = [t.name for t in getattr(dataset, "tasks", ()) if t.name in names]
    if not carried:
        return None
    index = [i for i in range(len(dataset)) if any(t in labels_of(dataset, i) for t in carried)]
    if not index:
        return None
    chosen = frozenset(carried)
    return AnnotationView(dataset, index, [chosen] * len(index), tasks=carried)


# ------------------------------------------------------------------------------- pseudo-label files
def pseudo_label_key(part: str, index: int, task: str) -> str:
    """Key of one pseudo-label in a file: dataset name, image index in that dataset's training split, task."""
    for name, value in (("dataset", part), ("task", task)):
        if "/" in value:
            raise UserError(f"pseudo-label {name} name {value!r} must not contain '/'")
    return f"{part}/{int(index)}/{task}"


def save_pseudo_labels(path: str | Path, labels: Mapping[str, torch.Tensor]) -> None:
    """Write ``{pseudo_label_key: tensor}`` as safetensors (integers stay integers)."""
    from safetensors.torch import save_file

    tensors = {k: torch.as_tensor(v).contiguous() for k, v in labels.items()}
    save_file(tensors, str(path), metadata={"format": "medexplore pseudo-labels 1"})


def load_pseudo_labels(path: str | Path) -> dict[str, dict[int, dict]]:
    """``{dataset: {image index: {task: label}}}`` from a file of :func:`save_pseudo_labels`.

    Integer scalars come back as ``int`` (the class-label convention of the datasets)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.pseudo_labels: {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"data.pseudo_labels: {path} is not a pseudo-label file ({error})") from None
    out: dict[str, dict[int, dict]] = {}
    for key, value in tensors.items():
        parts = key.split("/")
        if len(parts) != 3 or not parts[1].isdigit():
            raise UserError(f"data.pseudo_labels: {path} holds key {key!r}, expected 'dataset/index/task'")
        label = int(value) if value.dim() == 0 and not value.is_floating_point() else value
        out.setdefault(parts[0], {}).setdefault(int(parts[1]), {})[parts[2]] = label
    return out
