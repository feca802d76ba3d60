"""What a backbone learned, read by a linear probe: logistic regression on its frozen pooled embeddings, fitted on
each official MedMNIST training split (at most --train images, evenly spread) and scored on the whole test split.

Rows: the shipped VICReg backbone, the same architecture at random initialisation (the reference measured in the
same run: what the probe gets from no learning at all), and the supervised shipped model's pooled embedding (what
labels add). Usage:

    python benchmarks/probe_backbones.py [--root ../shared/data/medmnist] [--train 2000] [--out runs/probe]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import Subset

from medexplore.analysis.embeddings import compute_embeddings
from medexplore.data.medmnist import MedMNIST, medmnist_path
from medexplore.models.medformer import Medformer
from medexplore.train.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("pneumoniamnist", "breastmnist", "retinamnist", "adrenalmnist3d", "vesselmnist3d")
BACKBONE, SUPERVISED = "medformer-medmnist-embedded-vicreg-v1", "medformer-medmnist-embedded-v2"


def embed(model: Medformer, dataset, flag: str) -> tuple[np.ndarray, np.ndarray]:
    """Pooled embeddings and the ``flag`` labels of every image of ``dataset``."""
    pooled = compute_embeddings(model, dataset, tasks=False, progress=False).pooled
    labels = np.array([int(np.asarray(dataset[i].labels[flag]).reshape(-1)[0]) for i in range(len(dataset))])
    return pooled, labels


def probe(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> dict:
    """Test AUC (one-vs-rest mean for several classes, as MedMNIST's) and ACC of a logistic regression."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    classifier.fit(*train)
    proba = classifier.predict_proba(test[0])
    auc = roc_auc_score(test[1], proba[:, 1]) if proba.shape[1] == 2 else \
        roc_auc_score(test[1], proba, multi_class="ovr", labels=classifier.classes_)
    return {"auc": float(auc), "acc": float((classifier.predict(test[0]) == test[1]).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "medmnist"))
    parser.add_argument("--train", type=int, default=2000, help="training images per dataset for the probe")
    parser.add_argument("--out", default="runs/probe")
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone, _ = load_model(BACKBONE)
    models = {"VICReg backbone": backbone, "random init (same architecture)": Medformer(backbone.config, []),
              "supervised shipped model": load_model(SUPERVISED)[0]}
    flags = [f for f in FLAGS if medmnist_path(f, 28, args.root).exists()]
    results, seconds = {}, {}
    for name, model in models.items():
        model.eval()
        start = time.perf_counter()
        for flag in flags:
            train = MedMNIST(flag, "train", root=args.root, download=False)
            picks = np.linspace(0, len(train) - 1, min(args.train, len(train))).round().astype(int).tolist()
            fitted = embed(model, Subset(train, picks), flag)
            results.setdefault(flag, {})[name] = probe(fitted, embed(model, MedMNIST(flag, "test", root=args.root,
                                                                                      download=False), flag))
        seconds[name] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"results": results, "seconds": seconds, "train": args.train}, indent=1))
    header = " | ".join(f"{n} AUC / ACC" for n in models)
    lines = [f"| dataset | {header} |", "|---|" + "---|" * len(models)]
    for flag in flags:
        cells = " | ".join(f"{results[flag][n]['auc']:.3f} / {results[flag][n]['acc']:.3f}" for n in models)
        lines.append(f"| {flag} | {cells} |")
    lines.append("| wall time (embed + fit) | " + " | ".join(f"{seconds[n]:.0f} s" for n in models) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
