"""One multitask Medformer on five official MedMNIST v2 files against one model per dataset.

Trains ``configs/medmnist5.yaml`` (all five datasets in the same batches) and, with ``--singles``,
one model per dataset with the same recipe and that dataset's share of the budget (the multitask
run draws every dataset equally often, so each single run gets 1/5 of its steps). Prints per-dataset
test AUC / ACC over the seeds (mean +- standard deviation) beside the published MedMNIST v2 figures,
and wall time per run. Finished runs (with test_metrics.json) are reused: run it again to continue.

Usage: python benchmarks/medmnist5.py --root ../shared/data/medmnist [--seeds 0 1 2] [--singles]
       [--config configs/medmnist5.yaml] [--out runs/medmnist5] [--set train.epochs=12 ...]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Published test AUC / ACC (MedMNIST v2, Scientific Data 2023): ResNet-18 (28) for 2D, ResNet-18 3D and ACS for 3D.
PUBLISHED = {
    "pneumoniamnist": {"ResNet-18 (28)": (0.944, 0.854)},
    "breastmnist": {"ResNet-18 (28)": (0.901, 0.863)},
    "retinamnist": {"ResNet-18 (28)": (0.717, 0.524)},
    "adrenalmnist3d": {"ResNet-18 3D": (0.827, 0.721), "ResNet-18 ACS": (0.839, 0.754)},
    "vesselmnist3d": {"ResNet-18 3D": (0.874, 0.877), "ResNet-18 ACS": (0.930, 0.928)},
}


def train(config: Path, out: Path, overrides: list[str]) -> tuple[dict, float]:
    """Test metrics of one CLI training run (reused when it already finished) and its wall time."""
    timing = out / "wall_seconds.txt"
    if not (out / "test_metrics.json").exists():
        cmd = [sys.executable, "-m", "medexplore.cli", "train", "--config", str(config), "--out", str(out), "--quiet"]
        cmd += sum([["--set", s] for s in overrides], [])
        if (out / "checkpoints" / "last").exists():
            cmd.append("--resume")
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        timing.write_text(f"{time.perf_counter() - start:.1f}\n")
    seconds = float(timing.read_text()) if timing.exists() else float("nan")
    return json.loads((out / "test_metrics.json").read_text()), seconds


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {spread:.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "medmnist"), help="folder of the npz files")
    p.add_argument("--config", default=str(ROOT / "configs" / "medmnist5.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--singles", action="store_true", help="also train one model per dataset (budget share)")
    p.add_argument("--out", default="runs/medmnist5")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args()
    root = Path(args.root).resolve()
    config = yaml.safe_load(Path(args.config).read_text())
    datasets = list(config["data"]["datasets"])
    missing = [d for d in datasets if not (root / f"{d}.npz").exists()]
    if missing:
        sys.exit(f"{root}: no {', '.join(d + '.npz' for d in missing)} (official MedMNIST files); pass --root")
    steps = dict(config["train"], **{s.split("=", 1)[0].split(".", 1)[1]: s.split("=", 1)[1]
                                     for s in args.set if s.startswith("train.")})["steps_per_epoch"]
    base = [f"data.root={root}", *args.set]
    multi, single = {d: [] for d in datasets}, {d: [] for d in datasets}
    for seed in args.seeds:
        metrics, seconds = train(Path(args.config), Path(args.out) / f"multitask-seed{seed}", base + [f"train.seed={seed}"])
        print(f"multitask seed {seed}: {seconds / 60:.1f} min", flush=True)
        for d in datasets:
            multi[d].append(metrics[d])
        if args.singles:
            share = max(1, math.ceil(int(steps) / len(datasets)))
            for d in datasets:
                m, seconds = train(Path(args.config), Path(args.out) / f"single-{d}-seed{seed}",
                                   base + [f"train.seed={seed}", f"data.datasets=[{d}]",
                                           f"train.steps_per_epoch={share}", "train.balance=none"])
                single[d].append(m[d])
                print(f"single {d} seed {seed}: {seconds / 60:.1f} min", flush=True)
    print(f"\nTest AUC / ACC on the official files, {len(args.seeds)} seed(s) (mean +- sd):\n")
    print("| dataset | multitask AUC | multitask ACC | single AUC | single ACC | published AUC / ACC |")
    print("|---|---|---|---|---|---|")
    for d in datasets:
        published = "; ".join(f"{name} {auc:.3f} / {acc:.3f}" for name, (auc, acc) in PUBLISHED.get(d, {}).items())
        cells = [summary([m[k] for m in runs]) for runs in (multi[d], single[d]) for k in ("auc", "acc")]
        print(f"| {d} | {' | '.join(cells)} | {published} |")


if __name__ == "__main__":
    main()
