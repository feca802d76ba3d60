"""2D/3D projections of embeddings: PCA (torch or scikit-learn) and UMAP, cached on disk.

The cache key is a hash of the input array and every parameter, so re-running a notebook or
re-opening the napari explorer on the same embeddings costs one file read.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.embedded import cache_dir
from ..errors import UserError

__all__ = ["Projection", "pca", "umap", "exact_neighbors", "project", "projection_cache_dir", "warm_umap"]

METHODS = ("pca", "umap")
VERSIONS = {"pca": 1, "umap": 2}  # part of the cache key: UMAP 2 builds exact neighbour graphs
PCA_BACKENDS = ("torch", "sklearn")


@dataclass
class Projection:
    """``coords`` (N, n_components) and how they were made; ``explained_variance_ratio`` for PCA."""

    coords: np.ndarray
    method: str
    params: dict = field(default_factory=dict)
    explained_variance_ratio: np.ndarray | None = None
    cached: bool = False


def projection_cache_dir() -> Path:

    return cache_dir() / "projections"


def _check_features(x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise UserError(f"features must be a 2D (samples, features) array, got shape {x.shape}")
    if len(x) < 3:
        raise UserError(f"need at least 3 samples to project, got {len(x)}")
    if not np.issubdtype(x.dtype, np.number):
        raise UserError(f"features must be numeric, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(1))
        raise UserError(f"features have NaN/Inf in {len(rows)} row(s), e.g. rows {rows[:5].tolist()}")
    return x.astype(np.float32, copy=False)


def pca(features, n_components: int = 2, backend: str = "torch") -> Projection:
    """Principal components (coordinates centred; signs fixed so each axis' largest loading is positive)."""
    x = _check_features(features)
    if backend not in PCA_BACKENDS:
        raise UserError(f"PCA backend must be one of {PCA_BACKENDS}, got {backend!r}")
    if not 1 <= n_components <= min(x.shape):
        raise UserError(f"n_components must be in 1..{min(x.shape)}, got {n_components}")
    if backend == "sklearn":
        from sklearn.decomposition import PCA

        model = PCA(n_components=n_components, svd_solver="full").fit(x)
        components, ratio = model.components_, model.explained_variance_ratio_
    else:
        t = torch.from_numpy(x).double()
        t = t - t.mean(0)
        evals, evecs = torch.linalg.eigh(t.T @ t / (len(t) - 1))  # (D, D): fast for N >> D
        order = evals.argsort(descending=True)[:n_components]
        components = evecs[:, order].T.numpy()
        ratio = (evals[order] / evals.clamp_min(0).sum()).numpy()
    signs = np.sign(components[np.arange(n_components), np.abs(components).argmax(1)])
    components = components * signs[:, None]
    coords = (x - x.mean(0)) @ components.T.astype(np.float32)
    return Projection(coords.astype(np.float32), "pca", {"n_components": n_components, "backend": backend},
                      np.asarray(ratio, dtype=np.float64))


def _umap_class():
    """umap-learn's ``UMAP``, its numba functions compiled once per machine, not once per process.

    umap-learn and pynndescent mark few of their jitted functions ``cache=True``, so every fresh process
    spent most of its first UMAP compiling them. They are imported here while numba's ``njit`` / ``jit``
    default to ``cache=True``, with the cache in ``$MEDEXPLORE_CACHE/numba``; a function numba cannot cache
    is compiled as before. Imported earlier by someone else, they are used as they are.
    """
    if "umap" in sys.modules:
        return sys.modules["umap"].UMAP
    import numba

    if not numba.config.CACHE_DIR:
        numba.config.CACHE_DIR = str(cache_dir() / "numba")
    originals = numba.njit, numba.jit

    def caching(decorator):
        def decorate(*args, **kwargs):
            kwargs.setdefault("cache", True)
            return decorator(*args, **kwargs)
        return decorate

    numba.njit, numba.jit = caching(numba.njit), caching(numba.jit)
    try:
        from umap import UMAP
    finally:
        numba.njit, numba.jit = originals
    return UMAP


EXACT_METRICS = ("euclidean", "cosine")
EXACT_KNN_MAX = 50_000  # samples up to which the neighbours are found exactly (one matmul per chunk)


def exact_neighbors(features, k: int, metric: str = "euclidean") -> tuple[np.ndarray, np.ndarray]:
    """Each sample's ``k`` nearest samples, itself first: ``(N, k)`` int32 indices and float32 distances.

    Brute force in chunks of rows (``torch``'s matmul), for the metrics of ``EXACT_METRICS``; the cost
    grows as N^2, so :func:`umap` uses it up to ``EXACT_KNN_MAX`` samples.
    """
    x = torch.from_numpy(_check_features(features))
    if metric not in EXACT_METRICS:
        raise UserError(f"exact neighbours support {EXACT_METRICS}, got metric {metric!r}")
    if not 1 <= k <= len(x):
        raise UserError(f"k must be in 1..{len(x)} for {len(x)} samples, got {k}")
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    squares = (x * x).sum(1)
    chunk = max(1, (1 << 25) // len(x))  # rows per chunk: a (chunk, N) block of at most 128 MB
    indices, dists = [], []
    for lo in range(0, len(x), chunk):
        rows = torch.arange(lo, min(lo + chunk, len(x)))
        d2 = (squares[rows, None] + squares[None] - 2 * x[rows] @ x.T).clamp_min_(0)
        d2[torch.arange(len(rows)), rows] = -1.0  # a sample is its own first neighbour, ties or not
        best = d2.topk(k, dim=1, largest=False)
        indices.append(best.indices)
        dists.append(best.values.clamp_min(0))
    d2 = torch.cat(dists)
    distance = d2 / 2 if metric == "cosine" else d2.sqrt()  # |a - b|^2 = 2 - 2 cos for unit vectors
    return torch.cat(indices).int().numpy(), distance.float().numpy()


def umap(features, n_components: int = 2, n_neighbors: int = 15, min_dist: float = 0.1,
         metric: str = "euclidean", seed: int | None = 0) -> Projection:
    """UMAP (umap-learn). ``seed=None`` allows parallel, non-deterministic optimisation.

    Up to ``EXACT_KNN_MAX`` samples with a metric of ``EXACT_METRICS``, the neighbour graph is exact
    (:func:`exact_neighbors`) and handed to umap-learn, which then skips its approximate search
    (pynndescent, whose compilation no cache keeps: ~20 s of every fresh process's first UMAP).
    """
    x = _check_features(features)
    if not 2 <= n_neighbors < len(x):
        raise UserError(f"n_neighbors must be in 2..{len(x) - 1} for {len(x)} samples, got {n_neighbors}")
    exact = metric in EXACT_METRICS and len(x) <= EXACT_KNN_MAX
    knn = exact_neighbors(x, n_neighbors, metric) if exact else (None, None, None)
    UMAP = _umap_class()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        warnings.filterwarnings("ignore", message=".*[Cc]annot cache.*")
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")  # no transform() of new data needed
        reducer = UMAP(n_components=n_components, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric,
                       random_state=seed, precomputed_knn=knn)
        coords = reducer.fit_transform(x)
    params = {"n_components": n_components, "n_neighbors": n_neighbors, "min_dist": min_dist, "metric": metric,
              "seed": seed, "neighbors": "exact" if exact else "approximate"}
    return Projection(np.asarray(coords, dtype=np.float32), "umap", params)


def warm_umap() -> float:
    """Compile UMAP's numba code into ``$MEDEXPLORE_CACHE/numba`` (what set-up runs), so that a user's first
    UMAP in any later process loads it instead; returns the seconds it took."""
    start = time.perf_counter()
    umap(np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32), seed=0)
    return time.perf_counter() - start


def _key(x: np.ndarray, method: str, params: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"method": method, "version": VERSIONS[method], "params": params, "shape": x.shape,
                         "dtype": str(x.dtype)},
                        sort_keys=True).encode())
    h.update(np.ascontiguousarray(x).data)
    return h.hexdigest()[:24]


def project(features, method: str = "pca", cache: bool | str | Path = True, **params) -> Projection:
    """``pca`` or ``umap`` of ``features``, read from / written to the on-disk cache.

    ``cache``: True (``$MEDEXPLORE_CACHE/projections``), a folder, or False.
    """
    if method not in METHODS:
        raise UserError(f"projection method must be one of {METHODS}, got {method!r}")
    x = _check_features(features)
    func = pca if method == "pca" else umap
    if cache is False:
        return func(x, **params)
    folder = projection_cache_dir() if cache is True else Path(cache)
    path = folder / f"{method}-{_key(x, method, params)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                ratio = data["ratio"] if "ratio" in data.files else None
                return Projection(data["coords"], method, json.loads(str(data["params"])), ratio, cached=True)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a damaged cache entry is recomputed
    result = func(x, **params)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{np.random.randint(1 << 30)}.tmp.npz")
    extra = {} if result.explained_variance_ratio is None else {"ratio": result.explained_variance_ratio}
    try:
        np.savez(tmp, coords=result.coords, params=np.array(json.dumps(result.params)), **extra)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk costs the cache, not the result
    return result
