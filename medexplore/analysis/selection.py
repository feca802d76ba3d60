"""Picking points in an embedding: nearest neighbours, lasso/box selection, the point under the cursor.

Shared by the notebook explorer and the napari embedding explorer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UserError

__all__ = ["nearest_neighbours", "points_in_polygon", "points_in_box", "nearest_point"]


def nearest_neighbours(features: np.ndarray, index: int, k: int = 8, metric: str = "cosine") -> np.ndarray:
    """Indices of the ``k`` samples closest to sample ``index`` (itself excluded), closest first."""
    x = np.asarray(features, dtype=np.float64)
    if not 0 <= index < len(x):
        raise IndexError(f"index {index} out of range for {len(x)} samples")
    if metric not in ("cosine", "euclidean"):
        raise UserError(f"metric must be cosine or euclidean, got {metric!r}")
    if metric == "cosine":
        unit = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
        distance = 1 - unit @ unit[index]
    else:
        distance = np.linalg.norm(x - x[index], axis=1)
    distance[index] = np.inf
    k = min(k, len(x) - 1)
    nearest = np.argpartition(distance, k - 1)[:k] if k > 0 else np.array([], dtype=int)
    return nearest[np.argsort(distance[nearest], kind="stable")]


def points_in_polygon(coords: np.ndarray, vertices: Sequence[Sequence[float]]) -> np.ndarray:
    """Indices of the 2D points inside the polygon ``vertices`` (a lasso)."""
    from matplotlib.path import Path

    vertices = np.asarray(vertices, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 2 or len(vertices) < 3:
        raise UserError(f"a lasso needs at least 3 (x, y) vertices, got shape {vertices.shape}")
    return np.flatnonzero(Path(vertices).contains_points(np.asarray(coords)[:, :2]))


def points_in_box(coords: np.ndarray, corner_a: Sequence[float], corner_b: Sequence[float]) -> np.ndarray:
    """Indices of the 2D points inside the axis-aligned box spanned by two corners."""
    coords = np.asarray(coords)[:, :2]
    lo, hi = np.minimum(corner_a, corner_b), np.maximum(corner_a, corner_b)
    return np.flatnonzero(((coords >= lo) & (coords <= hi)).all(1))


def nearest_point(coords: np.ndarray, xy: Sequence[float], max_distance: float | None = None) -> int | None:
    """Index of the point closest to ``xy`` (within ``max_distance`` when given), or None."""
    coords = np.asarray(coords)[:, :2]
    if not len(coords):
        return None
    distance = np.hypot(*(coords - np.asarray(xy, dtype=np.float64)).T)
    best = int(distance.argmin())
    return best if max_distance is None or distance[best] <= max_distance else None
