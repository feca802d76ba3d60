"""Analysis costs: projections of 20,000 embeddings, Fisher spectra, attributions of a 64^3 volume.

Each case runs in a fresh subprocess (so UMAP's first fit pays numba's compilation, as a user's first
call does, and peak memory is the case's own). Ratios are against references measured in the same run:

- PCA (torch) and PCA (scikit-learn) of 20,000 x 192; target <= 1 s.
- UMAP of the same: first fit in a fresh process (import + compilation included), a second fit in
  that process, and the cached call through ``project`` (ratio cached / first); run twice on one new
  ``$MEDEXPLORE_CACHE``: a machine's first process (numba compiles and caches) and a later fresh
  process (numba's cache warm: the explorer's first view), with the ratio of their first fits.
- Fisher spectrum over 256 samples for medformer_tiny's last two blocks: per-sample gradients by
  ``vmap`` and by ``loop`` (classification labels), and ``loop`` with every embedded annotation;
  time and peak resident memory.
- Attribution of one 64^3 volume with medformer_tiny (patch 8): each method's time as a multiple of
  one forward pass.

Usage: python benchmarks/bench_analysis.py [--only pca,umap,fisher,attribution] [--points 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CASES = ("pca", "umap", "fisher", "attribution")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clustered(n: int, d: int = 192, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (12, d))
    return (centres[rng.integers(0, 12, n)] + rng.normal(0, 1, (n, d))).astype("float32")


def case_pca(points: int) -> dict:
    from medexplore.analysis import pca

    x = _clustered(points)
    out = {}
    for backend in ("torch", "sklearn", "torch", "sklearn"):  # alternate; keep the best of two
        start = time.perf_counter()
        pca(x, 2, backend)
        out[backend] = min(out.get(backend, float("inf")), time.perf_counter() - start)
    return {"pca_torch_s": out["torch"], "pca_sklearn_s": out["sklearn"], "ratio_torch_vs_sklearn":
            out["torch"] / out["sklearn"]}


def case_umap(points: int) -> dict:
    start = time.perf_counter()
    from medexplore.analysis import project, umap

    import_s = time.perf_counter() - start
    x = _clustered(points)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        project(x, "umap", cache=cache)
        first = time.perf_counter() - start
        start = time.perf_counter()
        umap(x, seed=1)
        second = time.perf_counter() - start
        start = time.perf_counter()
        cached = project(x, "umap", cache=cache)
        cached_s = time.perf_counter() - start
    assert cached.cached
    return {"import_s": import_s, "first_fit_s": first, "second_fit_s": second, "cached_call_s": cached_s,
            "ratio_cached_vs_first": cached_s / first}


def case_fisher(samples: int) -> dict:
    import torch

    from medexplore.analysis import fisher_spectrum
    from medexplore.data import ImageCentricView
    from medexplore.data.embedded import EmbeddedDataset
    from medexplore.data.registry import dataset_tasks, vocab_for
    from medexplore.models import create_model

    train = EmbeddedDataset("train")
    torch.manual_seed(0)
    model = create_model("medformer_tiny", tasks=dataset_tasks(train), vocab=vocab_for(train), patch_size=4)
    idx = torch.linspace(0, len(train) - 1, samples).long().tolist()
    presence = ImageCentricView(train, ["lesion"])
    out = {}
    for name, data, method in (("lesion_vmap", presence, "vmap"), ("lesion_loop", presence, "loop"),
                               ("all_tasks_loop", train, "loop")):
        picked = [data[i] for i in idx]
        before = _peak_mb()
        start = time.perf_counter()
        spectrum = fisher_spectrum(model, picked, method=method)
        out[f"{name}_s"] = time.perf_counter() - start
        out[f"{name}_peak_rss_mb"] = max(_peak_mb(), before)
        out["num_params"] = spectrum.num_params
        out[f"{name}_dominant_ratio"] = spectrum.dominant_ratio
    out["ratio_vmap_vs_loop"] = out["lesion_vmap_s"] / out["lesion_loop_s"]
    return out


def case_attribution(size: int) -> dict:
    import torch

    from medexplore.analysis import explain
    from medexplore.data.sample import Sample
    from medexplore.models import Batch, Domain, TaskSpec, create_model

    torch.manual_seed(0)
    model = create_model("medformer_tiny", tasks=[TaskSpec("tumour", "binary", 1),
                                                  TaskSpec("tissue", "segmentation", 4)], patch_size=8).eval()
    sample = Sample(torch.rand(1, size, size, size), Domain("3d", "mri", "brain"))
    with torch.no_grad():
        model(Batch.from_images([sample.image], [sample.domain]))
        start = time.perf_counter()
        model(Batch.from_images([sample.image], [sample.domain]))
        forward = time.perf_counter() - start
    out = {"forward_s": forward, "tokens": (size // 8) ** 3}
    for method, options in (("rollout", {}), ("attention", {}), ("grad_cam", {}),
                            ("integrated_gradients", {"steps": 32, "nt_samples": 4})):
        start = time.perf_counter()
        explain(model, sample, method, task="tumour", **options)
        out[f"{method}_s"] = time.perf_counter() - start
        out[f"{method}_vs_forward"] = out[f"{method}_s"] / forward
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(CASES))
    p.add_argument("--points", type=int, default=20000)
    p.add_argument("--fisher-samples", type=int, default=256)
    p.add_argument("--volume", type=int, default=64)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:  # child process: one case, one JSON line
        size = {"pca": args.points, "umap": args.points, "fisher": args.fisher_samples, "attribution": args.volume}
        print(json.dumps(globals()[f"case_{args.case}"](size[args.case])))
        return
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for case in args.only.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; choose from {CASES}")
        cmd = [sys.executable, __file__, "--case", case, "--points", str(args.points),
               "--fisher-samples", str(args.fisher_samples), "--volume", str(args.volume)]
        if case != "umap":
            _run_case(case, cmd)
            continue
        with tempfile.TemporaryDirectory() as cache:  # one new machine: its first process, then a later one
            env = {**os.environ, "MEDEXPLORE_CACHE": cache}
            cold = _run_case("umap, first process on this machine", cmd, env)
            warm = _run_case("umap, a later fresh process", cmd, env)
        if cold and warm:
            print(f"umap first fit, later process / first process: {warm['first_fit_s'] / cold['first_fit_s']:.2f}")


def _run_case(label: str, cmd: list[str], env: dict | None = None) -> dict | None:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        print(f"{label}: failed\n{result.stderr[-2000:]}")
        return None
    values = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{label}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))
    return values


if __name__ == "__main__":
    main()
