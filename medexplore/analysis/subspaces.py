"""Shared vs modality-specific latent subspaces (the analysis of MultiMedVision).

Each modality's embeddings span a principal subspace. Directions that lie in *every* modality's
subspace form the shared subspace: they are the eigenvectors of the mean of the modalities'
projectors whose eigenvalue is close to 1 (a direction present in only one of M subspaces has
eigenvalue about 1/M). What remains of a modality's subspace once the shared part is removed is
its specific complement.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import UserError

__all__ = ["SubspaceAnalysis", "principal_subspace", "principal_angles", "shared_subspace",
           "analyze_subspaces", "linear_decodability"]


def principal_subspace(x: np.ndarray, k: int | None = None, variance: float = 0.9) -> np.ndarray:
    """(D, k) orthonormal basis of the top principal directions of ``x`` (centred).

    ``k`` fixes the dimension; otherwise the smallest k explaining ``variance`` of the variance.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise UserError(f"need a (samples >= 2, features) array, got shape {x.shape}")
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    if k is None:
        if not 0 < variance <= 1:
            raise UserError(f"variance must be in (0, 1], got {variance}")
        energy = np.cumsum(s ** 2) / max((s ** 2).sum(), 1e-300)
        k = int(np.searchsorted(energy, variance - 1e-12) + 1)
    if not 1 <= k <= len(s):
        raise UserError(f"subspace dimension must be in 1..{len(s)}, got {k}")
    return vt[:k].T


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, ascending) between the spans of orthonormal bases ``a`` and ``b``."""
    if a.shape[0] != b.shape[0]:
        raise UserError(f"bases live in different spaces: {a.shape[0]} vs {b.shape[0]} dimensions")
    cosines = np.linalg.svd(a.T @ b, compute_uv=False)
    return np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))


def shared_subspace(bases: list[np.ndarray], threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(D, s) basis of the directions common to all ``bases``, and the mean projector's eigenvalues.

    A direction counts as shared when its eigenvalue exceeds ``threshold`` (default: halfway
    between 1 and (M-1)/M, the largest value a direction missing from one subspace can reach).
    """
    if len(bases) < 2:
        raise UserError(f"need the subspaces of at least 2 groups, got {len(bases)}")
    m = len(bases)
    mean_projector = sum(b @ b.T for b in bases) / m
    evals, evecs = np.linalg.eigh(mean_projector)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    threshold = (1 + (m - 1) / m) / 2 if threshold is None else threshold
    return evecs[:, evals > threshold], evals


def _orthonormal(x: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    if x.shape[1] == 0:
        return x
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, s > tol * max(s.max(), 1e-300)]


def linear_decodability(features: np.ndarray, target, folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated balanced accuracy of a logistic regression predicting ``target`` from ``features``.

    Returns ``{"balanced_accuracy", "std", "chance", "classes"}``; NaN when a class has fewer
    members than ``folds`` or there is a single class.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    target = pd.Series(target).astype(str).to_numpy()
    classes, counts = np.unique(target, return_counts=True)
    nan = {"balanced_accuracy": float("nan"), "std": float("nan"), "chance": float("nan"), "classes": len(classes)}
    if len(classes) < 2 or counts.min() < folds or features.shape[1] == 0:
        return nan
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_score(clf, features, target, scoring="balanced_accuracy",
                             cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return {"balanced_accuracy": float(scores.mean()), "std": float(scores.std()), "chance": 1.0 / len(classes),
            "classes": len(classes)}


@dataclass
class SubspaceAnalysis:
    """Results of :func:`analyze_subspaces`.

    Attributes:
        groups: group names (modalities) in order.
        bases: per group, its (D, k) principal basis.
        shared: (D, s) shared basis; ``specific``: per group, its (D, k_g) specific complement.
        angles: groups x groups DataFrame of the mean principal angle (degrees) between subspaces.
        variance: per group, the fraction of its variance in the shared subspace, in its specific
            complement, and in neither.
        decodability: balanced accuracy of predicting each target from the shared part, the specific
            parts and all features.
        mean_projector_eigenvalues: how strongly each direction is shared (1 = by all groups).
    """

    groups: list[str]
    bases: dict[str, np.ndarray]
    shared: np.ndarray
    specific: dict[str, np.ndarray]
    angles: pd.DataFrame
    variance: pd.DataFrame
    decodability: pd.DataFrame
    mean_projector_eigenvalues: np.ndarray


def analyze_subspaces(features: np.ndarray, metadata: pd.DataFrame, group: str = "modality",
                      k: int | None = None, variance: float = 0.9, targets: list[str] | None = None,
                      min_samples: int = 10, folds: int = 5, seed: int = 0) -> SubspaceAnalysis:
    """Per-group principal subspaces, their angles, the shared subspace and specific complements.

    Args:
        features: (N, D) embeddings; ``metadata``: one row per sample with the ``group`` column.
        k, variance: each group's subspace dimension (fixed ``k``, or enough for ``variance``).
        targets: metadata columns to decode (default: ``group``, ``dimensionality`` and every
            ``label:`` column with fewer than 20 distinct values).
        min_samples: groups with fewer samples are left out.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) != len(metadata):
        raise UserError(f"features {features.shape} and metadata ({len(metadata)} rows) do not match")
    if group not in metadata.columns:
        raise KeyError(f"metadata has no column {group!r}; columns: {list(metadata.columns)}")
    labels = metadata[group].astype(str).to_numpy()
    names = [g for g in dict.fromkeys(labels) if (labels == g).sum() >= min_samples]
    if len(names) < 2:
        raise UserError(f"need at least 2 {group} groups with >= {min_samples} samples, got {names}")
    bases = {g: principal_subspace(features[labels == g], k, variance) for g in names}
    shared, evals = shared_subspace(list(bases.values()))
    outside_shared = np.eye(features.shape[1]) - shared @ shared.T
    specific = {g: _orthonormal(outside_shared @ b, tol=0.5) for g, b in bases.items()}  # drop what is mostly shared

    angles = pd.DataFrame([[float(principal_angles(bases[a], bases[b]).mean()) for b in names] for a in names],
                          index=names, columns=names)
    rows = []
    for g in names:
        x = features[labels == g]
        x = x - x.mean(0)
        total = (x ** 2).sum()
        in_shared = ((x @ shared) ** 2).sum() / total
        in_specific = ((x @ specific[g]) ** 2).sum() / total
        rows.append({group: g, "shared": in_shared, "specific": in_specific,
                     "residual": max(0.0, 1 - in_shared - in_specific), "dim_shared": shared.shape[1],
                     "dim_specific": specific[g].shape[1], "n": int((labels == g).sum())})
    variance_table = pd.DataFrame(rows)

    keep = np.isin(labels, names)
    all_specific = _orthonormal(np.concatenate(list(specific.values()), 1))
    centred = features[keep] - features[keep].mean(0)
    views = {"shared": centred @ shared, "specific": centred @ all_specific, "all": centred}
    if targets is None:
        targets = [group] + [c for c in ("dimensionality",) if c in metadata.columns and c != group]
        targets += [c for c in metadata.columns  # labels with 2-19 classes present (none: a task without labels here)
                    if c.startswith("label:") and 2 <= metadata[c].nunique(dropna=True) < 20]
    decode = []
    for target in targets:
        values = metadata.loc[keep, target]
        present = values.notna().to_numpy()
        for view, x in views.items():
            result = linear_decodability(x[present], values[present], folds, seed)
            decode.append({"target": target, "features": view, "dim": x.shape[1], **result})
    return SubspaceAnalysis(names, bases, shared, specific, angles, variance_table, pd.DataFrame(decode), evals)
