"""PneumoniaMNIST with the CLI: test AUC/ACC over seeds, mean and spread, and wall time per run.

Usage: python benchmarks/pneumonia.py [--seeds 0 1 2] [--npz ../shared/data/medmnist/pneumoniamnist.npz] [--out runs/bench]
       [--pretrain-epochs 0] [--set train.epochs=10 ...]
With --pretrain-epochs N, each seed first runs VICReg on the same training images and fine-tunes from it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--npz", default=str(ROOT.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"),
                   help="the official PneumoniaMNIST file (default: ../shared/data/medmnist)")
    p.add_argument("--out", default="runs/bench-pneumonia")
    p.add_argument("--config", default="configs/pneumoniamnist.yaml")
    p.add_argument("--pretrain-epochs", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    if not Path(args.npz).exists():
        sys.exit(f"{args.npz} not found (the official PneumoniaMNIST file); pass --npz")
    cli = [sys.executable, "-m", "medexplore.cli"]
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        overrides = sum([["--set", s] for s in args.set + [f"train.seed={seed}"]], [])
        init, pre_s = [], 0.0
        if args.pretrain_epochs:
            pre_out = Path(args.out) / f"seed{seed}-vicreg"
            pre_s = run(cli + ["pretrain", "--config", args.config, "--data-path", args.npz, "--out", str(pre_out), "--quiet",
                               *overrides, "--set", f"train.epochs={args.pretrain_epochs}", "--set", "train.balance=none"])
            init = ["--init", str(pre_out / "checkpoints" / "last")]
        train_s = run(cli + ["train", "--config", args.config, "--data-path", args.npz, "--out", str(out), "--quiet",
                             *overrides, *init])
        m = json.loads((out / "test_metrics.json").read_text())["pneumoniamnist"]
        rows.append((seed, m["auc"], m["acc"], pre_s, train_s))
        print(f"seed {seed}: test AUC {m['auc']:.4f} ACC {m['acc']:.4f}  (pretrain {pre_s / 60:.1f} min, train {train_s / 60:.1f} min)",
              flush=True)
    aucs, accs = [r[1] for r in rows], [r[2] for r in rows]
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    print(f"\nmean over {len(rows)} seeds: AUC {statistics.mean(aucs):.4f} +- {sd(aucs):.4f}   "
          f"ACC {statistics.mean(accs):.4f} +- {sd(accs):.4f}   (goal 0.975 / 0.90; ResNet-18 (28) 0.944 / 0.854)")


if __name__ == "__main__":
    main()
