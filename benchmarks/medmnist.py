"""Medformer with its defaults against a ResNet-18 trained beside it, on every official MedMNIST file.

For each dataset found under ``--root`` (28-px files in the medmnist layout) and each seed it trains:

- **ours**: ``medexplore train --dataset FLAG`` with no config, i.e. the MedMNIST recipe
  (``medexplore/configs/medmnist.yaml``: conv stem, patch 4, depth 6, width 128; epochs derived from
  the dataset's size so that a run sees 32,000 training images in 2D and 24,000 in 3D), best
  checkpoint by validation AUC, scored on the test split;
- **the baseline**: ``benchmarks/baselines.py`` (ResNet-18, MedMNIST 28-px variant in 2D; torchvision
  ``r3d_18`` with a one-channel stem in 3D), 32,000 training images in 2D and 8,000 in 3D (the
  wall-time column compares the cost), best epoch by validation AUC.

It prints and writes (``OUT/results.md``, ``OUT/results.json``) per dataset: test AUC / ACC of both
(mean +- sd over the seeds), the published MedMNIST v2 ResNet-18 rows, wall minutes per run and
parameters. Finished runs are reused, so an interrupted benchmark continues where it stopped.

Usage: python benchmarks/medmnist.py --root ../shared/data/medmnist [--seeds 0 1 2] [--datasets breastmnist ...]
       [--out runs/medmnist] [--one-model [--pretrain STEPS | --init CHECKPOINT]] [--no-baseline] [--no-single] [--report]
       [--set train.lr=5e-4 ...]
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import baselines
import yaml

from medexplore.data.medmnist import MEDMNIST
from medexplore.train.checkpoint import final_checkpoint, load_model

ROOT = Path(__file__).resolve().parents[1]
# Published test AUC / ACC (MedMNIST v2, Scientific Data 2023): ResNet-18 (28) in 2D, ResNet-18 3D in 3D.
PUBLISHED = {
    "pneumoniamnist": (0.944, 0.854), "breastmnist": (0.901, 0.863), "retinamnist": (0.717, 0.524),
    "adrenalmnist3d": (0.827, 0.721), "vesselmnist3d": (0.874, 0.877),
}


def run_cli(args: list[str], root: Path, seed: int, out: Path, flags: list[str], train: bool = True,
            command: str = "train") -> dict | None:
    """One ``medexplore train`` run (reused when finished, resumed when interrupted): per dataset its test
    metrics and best validation AUC, with the run's wall time and parameters. ``train=False``: only a
    finished run's record (None if there is none). ``command="pretrain"``: a VICReg run, whose record is
    its wall time only."""
    record = out / "outcome.json"
    if record.exists():
        return json.loads(record.read_text())
    if not train:
        return None
    cmd = [sys.executable, "-m", "medexplore.cli", command, *args, "--out", str(out), "--quiet",
           "--set", f"data.root={root}", "--set", f"train.seed={seed}"]
    spent = out / "wall_seconds.txt"
    if (out / "checkpoints" / "last").exists():
        cmd.append("--resume")
    else:  # stopped before its first checkpoint: it starts again, and so does its clock
        spent.unlink(missing_ok=True)
    before = float(spent.read_text()) if spent.exists() else 0.0
    start = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, cwd=ROOT)
    finally:
        out.mkdir(parents=True, exist_ok=True)
        spent.write_text(f"{before + time.perf_counter() - start:.1f}\n")
    if command == "pretrain":
        result = {"seed": seed, "wall_s": float(spent.read_text())}
        record.write_text(json.dumps(result))
        return result
    return record_outcome(out, seed, flags)


def record_outcome(out: Path, seed: int, flags: list[str]) -> dict:
    """Write (and return) ``out/outcome.json`` of a finished run folder."""
    record, spent = out / "outcome.json", out / "wall_seconds.txt"
    model, _ = load_model(final_checkpoint(out))
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tests = json.loads((out / "test_metrics.json").read_text())
    result = {"seed": seed, "wall_s": float(spent.read_text()), "epochs": len(epochs),
              "params": sum(p.numel() for p in model.parameters()),
              "datasets": {f: {"test": tests[f], "val_auc": max(e["val"][f]["auc"] for e in epochs)} for f in flags}}
    record.write_text(json.dumps(result, indent=1, default=float))
    return result


def train_ours(flag: str, root: Path, seed: int, out: Path, overrides: list[str], train: bool = True) -> dict | None:
    """The default recipe on one dataset: ``medexplore train --dataset FLAG`` with no config."""
    run = run_cli(["--dataset", flag, *sum([["--set", s] for s in overrides], [])], root, seed, out, [flag], train)
    return run and {**run, **run["datasets"][flag]}


def train_one_model(flags: list[str], root: Path, seed: int, out: Path, overrides: list[str],
                    train: bool = True, pretrain_steps: int = 0, init: str | None = None) -> dict | None:
    """ONE Medformer on all ``flags`` together (``configs/medmnist.yaml``, the same recipe).

    ``pretrain_steps > 0``: first VICReg on the training images of all ``flags`` for about that many steps
    (epochs of ~100 steps, so it can resume; same model, batch and learning rate; ``OUT-vicreg``), then the supervised run starts from it
    (``--init``); the wall time reported is both runs'. ``init``: start from that checkpoint or shipped model
    instead (e.g. a VICReg backbone pretrained elsewhere; its time is not counted)."""
    config = ROOT / "configs" / "medmnist.yaml"
    args = ["--config", str(config)]
    if set(flags) != set(yaml.safe_load(config.read_text())["data"]["datasets"]):
        args += ["--set", f"data.datasets={json.dumps(flags)}"]
    args += sum([["--set", s] for s in overrides], [])
    pretrained = None
    if pretrain_steps:
        vicreg_out = out.with_name(out.name + "-vicreg")
        epochs = max(1, round(pretrain_steps / 100))
        length = ["--set", f"train.epochs={epochs}", "--set", f"train.steps_per_epoch={pretrain_steps // epochs}"]
        pretrained = run_cli([*args, *length], root, seed, vicreg_out, flags, train, command="pretrain")
        if pretrained is None:
            return None
        args += ["--init", str(vicreg_out / "checkpoints" / "last")]
    elif init:
        args += ["--init", init]
    run = run_cli(args, root, seed, out, flags, train)
    if run is not None and pretrained is not None:
        run = {**run, "wall_s": run["wall_s"] + pretrained["wall_s"], "pretrain_wall_s": pretrained["wall_s"]}
    return run


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def table(rows: dict[str, dict[str, list[dict]]], one_model: list[dict]) -> str:
    seeds = sorted({r["seed"] for runs in rows.values() for side in runs.values() for r in side} |
                   {r["seed"] for r in one_model})
    lines = [f"Test AUC / ACC on the official files, mean +- sd over the finished seeds of {seeds} (n: how many); "
             "wall minutes per run on this machine.", "",
             "| dataset | Medformer val AUC | Medformer AUC | Medformer ACC | ResNet-18 AUC (same run) | ResNet-18 ACC "
             "| published R18 AUC / ACC | n ours / R18 | min ours / R18 | params ours / R18 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for flag, runs in rows.items():
        ours, base = runs["ours"], runs["baseline"]
        cells = [mean_sd([r["test"][k] for r in side]) for side in (ours, base) for k in ("auc", "acc")]
        auc, acc = PUBLISHED.get(flag, (float("nan"), float("nan")))
        minutes = " / ".join(f"{statistics.mean(r['wall_s'] for r in side) / 60:.1f}" if side else "-" for side in (ours, base))
        params = " / ".join(f"{side[0]['params'] / 1e6:.2f}M" if side else "-" for side in (ours, base))
        val = mean_sd([r["val_auc"] for r in ours])
        lines.append(f"| {flag} | {val} | {' | '.join(cells)} | {auc:.3f} / {acc:.3f} | {len(ours)} / {len(base)} "
                     f"| {minutes} | {params} |")
    if one_model:
        minutes = statistics.mean(r["wall_s"] for r in one_model) / 60
        lines += ["", f"ONE Medformer on all {len(rows)} files together (`configs/medmnist.yaml`), seeds "
                  f"{[r['seed'] for r in one_model]}: {one_model[0]['params'] / 1e6:.2f}M parameters, "
                  f"{minutes:.1f} min per run for all of them.", "",
                  "| dataset | one model val AUC | one model AUC | one model ACC | alone AUC | ResNet-18 AUC (same run) "
                  "| published R18 AUC / ACC |", "|---|---|---|---|---|---|---|"]
        for flag, runs in rows.items():
            mine = [r["datasets"][flag] for r in one_model if flag in r["datasets"]]
            auc, acc = PUBLISHED.get(flag, (float("nan"), float("nan")))
            lines.append(f"| {flag} | {mean_sd([r['val_auc'] for r in mine])} | "
                         f"{mean_sd([r['test']['auc'] for r in mine])} | {mean_sd([r['test']['acc'] for r in mine])} | "
                         f"{mean_sd([r['test']['auc'] for r in runs['ours']])} | "
                         f"{mean_sd([r['test']['auc'] for r in runs['baseline']])} | {auc:.3f} / {acc:.3f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "medmnist"), help="folder of the npz files")
    p.add_argument("--datasets", nargs="+", help="MedMNIST flags (default: every official 28-px file under --root)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/medmnist")
    p.add_argument("--no-baseline", action="store_true", help="train no ResNet-18")
    p.add_argument("--no-single", action="store_true", help="train no one-dataset Medformer")
    p.add_argument("--one-model", action="store_true",
                   help="also train ONE Medformer on all the datasets together (configs/medmnist.yaml)")
    p.add_argument("--pretrain", type=int, default=0, metavar="STEPS",
                   help="one model: VICReg pretraining on all the datasets' training images for STEPS steps first")
    p.add_argument("--init", metavar="CHECKPOINT", help="one model: start from this checkpoint or shipped model "
                   "(e.g. medformer-medmnist-embedded-vicreg-v1); not with --pretrain")
    p.add_argument("--report", action="store_true", help="train nothing: the table of the finished runs")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="change the recipe")
    args = p.parse_args()
    # `kill` stops the training run too: SystemExit makes subprocess.run kill its child, and `last` is kept for a rerun
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.init and args.pretrain:
        p.error("--init and --pretrain both choose the one model's starting weights; pass one")
    root, out = Path(args.root).resolve(), Path(args.out)
    flags = args.datasets or [f for f in MEDMNIST if (root / f"{f}.npz").exists()]
    missing = [f for f in flags if not (root / f"{f}.npz").exists()]
    if not flags or missing:
        sys.exit(f"{root}: no official MedMNIST file for {missing or 'any dataset'}; pass --root")
    rows = {f: {"ours": [], "baseline": []} for f in flags}
    one_model = []
    for seed in args.seeds:
        for flag in flags:
            ours = train_ours(flag, root, seed, out / f"medformer-{flag}-seed{seed}", args.set,
                              train=not (args.report or args.no_single))
            base = baselines.cached(flag, seed, out / "baselines")
            if base is None and not (args.report or args.no_baseline):
                base = baselines.run_cached(flag, root, seed, out / "baselines", log=lambda s: None)
            line = [f"{flag} seed {seed}:"]
            for name, run, side in (("Medformer", ours, "ours"), ("ResNet-18", base, "baseline")):
                if run is not None:
                    rows[flag][side].append(run)
                    line.append(f"{name} AUC {run['test']['auc']:.3f} ACC {run['test']['acc']:.3f} "
                                f"({run['wall_s'] / 60:.1f} min)")
            print(" ".join(line), flush=True)
        if args.one_model:
            run = train_one_model(flags, root, seed, out / f"one-model-seed{seed}", args.set, train=not args.report,
                                  pretrain_steps=args.pretrain, init=args.init)
            if run is not None:
                one_model.append(run)
                print(f"one model seed {seed}: " + ", ".join(
                    f"{f} AUC {run['datasets'][f]['test']['auc']:.3f}" for f in flags) +
                    f" ({run['wall_s'] / 60:.1f} min)", flush=True)
    text = table(rows, one_model)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"single": rows, "one_model": one_model}, indent=1, default=float))


if __name__ == "__main__":
    main()
