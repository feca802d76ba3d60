"""Evaluation protocol of the adaptation benchmark: patient-level splits for out-of-distribution tests."""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset, Subset

from ..errors import UserError

__all__ = ["patient_ids", "patient_split", "PROMPT_COUNTS"]

PROMPT_COUNTS = (1, 5, 10, 50, 100)


def patient_ids(dataset: Dataset, name: str = "dataset") -> list[str]:
    """Each sample's patient id; a ValueError naming ``name`` when a sample has none."""
    ids = getattr(dataset, "patient_ids", None)
    ids = list(ids) if ids is not None else [dataset[i].patient_id for i in range(len(dataset))]
    missing = [i for i, p in enumerate(ids) if p is None]
    if missing:
        raise UserError(f"{name}: {len(missing)} of {len(ids)} samples have no patient id (e.g. sample {missing[0]}); "
                         "patient-level splits need them (MedMNIST files carry none; a folder CSV can)")
    return [str(p) for p in ids]


def patient_split(datasets: dict[str, Dataset], holdout: float = 0.25, seed: int = 0,
                  held_out: list[str] | None = None) -> tuple[dict[str, Subset], dict[str, Subset], list[str]]:
    """Split every split of a dataset by patient, the same patients held out in all of them.

    ``datasets`` maps split names (train, val, test) to datasets. ``held_out`` names the patients to
    hold out; otherwise ``round(holdout * patients)`` (at least 1, at most all but 1) are drawn with
    ``seed``. Returns ``(seen, unseen, held_out)``: per split the samples of patients the model may
    train on, and per split those of held-out patients (the out-of-distribution test).
    """
    if not 0 < holdout < 1:
        raise UserError(f"holdout must be in (0, 1), got {holdout}")
    ids = {split: patient_ids(ds, split) for split, ds in datasets.items()}
    patients = sorted({p for split_ids in ids.values() for p in split_ids})
    if len(patients) < 2:
        raise UserError(f"patient-level split needs >= 2 patients, found {patients}")
    if held_out is None:
        count = min(max(1, round(holdout * len(patients))), len(patients) - 1)
        held_out = sorted(np.random.default_rng(seed).choice(patients, count, replace=False).tolist())
    unknown = sorted(set(held_out) - set(patients))
    if unknown:
        raise UserError(f"held-out patient(s) {unknown} not in the data; patients: {patients}")
    held = set(held_out)
    seen = {s: Subset(ds, [i for i, p in enumerate(ids[s]) if p not in held]) for s, ds in datasets.items()}
    unseen = {s: Subset(ds, [i for i, p in enumerate(ids[s]) if p in held]) for s, ds in datasets.items()}
    return seen, unseen, sorted(held)
