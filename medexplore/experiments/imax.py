"""IMAX: image-centric multi-annotation data against decentralized data, the Fisher spectra of both,
and three-stage pseudo-labelling (train decentralized, label what each image lacks, retrain)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from ..analysis.fisher import fisher_over_checkpoints
from ..data.registry import build_dataset
from ..data.sampling import labels_of
from ..errors import UserError
from ..train.checkpoint import list_snapshots, load_model
from ..train.pseudo import pseudo_label
from ..viz.analysis import fisher_curves
from ..viz.experiments import arm_bars
from .base import Experiment, arm_gaps, higher_is_better, spread_verdict, task_rows
from .report import Report, mean_spread, summarise

__all__ = ["imax_vs_dmax", "PSEUDO_THRESHOLD", "FISHER_PROBES"]

PSEUDO_THRESHOLD = 0.9  # confidence a prediction needs to become a pseudo-label
FISHER_PROBES = 16  # training images (every annotation) whose per-sample gradients give the Fisher spectrum
ARMS = ("image-centric", "decentralized", "pseudo-labelled")


def _check_multi_annotation(exp: Experiment) -> None:
    train = build_dataset(exp.settings.data, "train")
    most = max(len(labels_of(train, i)) for i in range(min(len(train), 256)))
    if most < 2:
        raise UserError(f"imax-vs-dmax needs images with several annotations (e.g. --data embedded, or a folder "
                         f"dataset with several tasks); {exp.settings.datasets} give one label per image")


def _fisher_track(exp: Experiment, key: str, probes: list) -> pd.DataFrame:

    cached = exp.out / "fisher" / f"{key}.csv"
    if cached.exists():
        return pd.read_csv(cached)
    cached.parent.mkdir(exist_ok=True)
    frame = fisher_over_checkpoints(list_snapshots(exp.run_dir(key)), probes, progress=False)
    frame.to_csv(cached, index=False)
    return frame


def _pseudo_labels(exp: Experiment, seed: int, decentralized: dict, data: dict) -> tuple[str, dict]:
    """Stage 2: the decentralized model labels what each training image lacks (file and quality cached)."""
    folder = exp.out / "pseudo_labels"
    folder.mkdir(exist_ok=True)
    path, quality_path = folder / f"seed{seed}.safetensors", folder / f"seed{seed}.json"
    if not (path.exists() and quality_path.exists()):
        model, _ = load_model(decentralized["checkpoint"])
        result = pseudo_label(model, data, PSEUDO_THRESHOLD)
        result.save(path)
        quality_path.write_text(json.dumps(result.quality, indent=1, default=float))
    return str(path), json.loads(quality_path.read_text())


def _signed_gap(a: float, b: float, metric: str) -> float:
    """How much ``a`` beats ``b`` (positive = better), relative to ``b``, in percent."""
    diff = a - b if higher_is_better(metric) else b - a
    return 100 * diff / abs(b) if b else float("nan")


def imax_vs_dmax(exp: Experiment) -> Report:
    _check_multi_annotation(exp)
    total_steps = exp.settings.recipe["train"]["epochs"] * exp.settings.recipe["train"]["steps_per_epoch"]
    keep_every = max(1, total_steps // 3)  # three snapshots per run for the Fisher spectrum
    probes = exp.samples("train", n=FISHER_PROBES)  # the same images, every annotation, for every run
    rows, tracks, quality_rows = [], {}, []
    for seed in exp.settings.seeds:
        outcomes = {}
        for arm in ARMS[:2]:
            data = {"annotations": arm, "subset_seed": seed}
            outcomes[arm] = exp.train(f"{arm}-seed{seed}", exp.config(seed, data=data, train={"keep_every": keep_every}))
            rows += task_rows(outcomes[arm], arm=arm, seed=seed)
            tracks[f"{arm} s{seed}"] = _fisher_track(exp, f"{arm}-seed{seed}", probes).assign(arm=arm, seed=seed)
        data = {**exp.settings.data, "annotations": "decentralized", "subset_seed": seed}
        path, quality = _pseudo_labels(exp, seed, outcomes["decentralized"], data)
        quality_rows += [{"seed": seed, "task": t, **q} for t, q in quality.items()]
        pseudo = exp.train(f"pseudo-labelled-seed{seed}", exp.config(seed, data={**data, "pseudo_labels": path}))
        rows += task_rows(pseudo, arm="pseudo-labelled", seed=seed)
    return _report(exp, pd.DataFrame(rows), tracks, pd.DataFrame(quality_rows))


def _report(exp: Experiment, rows: pd.DataFrame, tracks: dict, quality: pd.DataFrame) -> Report:

    rows.to_csv(exp.out / "metrics.csv", index=False)
    report = Report("IMAX: image-centric against decentralized multi-annotation data",
                    f"Data {exp.settings.datasets}, budget `{exp.settings.budget}`, seeds {list(exp.settings.seeds)}. "
                    "Both arms draw from the same training images and give every task the same number of labels: "
                    "decentralized keeps ONE annotation per image (tasks taken in turn), image-centric keeps EVERY "
                    "annotation of 1/T of the images; both train for the same steps. Pseudo-labelled: the "
                    f"decentralized model labels each image's missing annotations (confidence >= {PSEUDO_THRESHOLD}), "
                    "then a model trains on the decentralized labels plus the pseudo-labels. Test split, full annotations.")
    table = summarise(rows, ["task", "metric", "arm"], ["value"]).pivot(index=["task", "metric"], columns="arm",
                                                                      values="value").reset_index()
    means = rows.groupby(["task", "metric", "arm"])["value"].mean().unstack("arm")
    gaps, recovered = [], []
    for (task, metric), m in means.iterrows():
        gain = _signed_gap(m["image-centric"], m["decentralized"], metric)
        gaps.append(gain)
        back = _signed_gap(m["pseudo-labelled"], m["decentralized"], metric)
        recovered.append(back / gain if gain > 0 else float("nan"))
    order = [(t, m) for t, m in zip(table["task"], table["metric"])]
    index = {key: k for k, key in enumerate(means.index)}
    table["image-centric vs decentralized (%)"] = [gaps[index[key]] for key in order]
    table["gap recovered by pseudo-labels"] = [recovered[index[key]] for key in order]
    table = table[["task", "metric", *ARMS, "image-centric vs decentralized (%)", "gap recovered by pseudo-labels"]]
    better = [g for g in gaps if g == g]
    outcomes = arm_gaps(rows, ["task", "metric"], "image-centric", "decentralized").outcome
    report.verdict("image-centric data beats decentralized data (IMAX: +3.2% to +21% across tasks)",
                   spread_verdict(outcomes), f"better on {sum(g > 0 for g in better)} of {len(better)} tasks, by more "
                   f"than the seed sd on {(outcomes > 0).sum()}, behind by more on {(outcomes < 0).sum()}; relative gap "
                   f"{min(better):+.1f}% to {max(better):+.1f}%, mean {np.mean(better):+.1f}%")
    useful = [r for r in recovered if r == r]
    report.verdict("pseudo-labelling recovers part of the gap", (np.mean(useful) > 0) if useful else None,
                   f"mean recovered share {np.mean(useful):+.2f} over the {len(useful)} tasks with a gap" if useful
                   else "no task where image-centric was better")
    report.table("Test metric per task (mean ± sd over seeds)", table,
                 "Relative gap: image-centric over decentralized in percent of decentralized (for MAE, lower is "
                 "better and the sign is flipped). Recovered: (pseudo - decentralized) / (image-centric - decentralized).")
    fisher = pd.concat(tracks.values(), ignore_index=True)
    fisher.to_csv(exp.out / "fisher.csv", index=False)
    last = fisher[fisher["step"] == fisher["step"].max()]
    spectra = summarise(last, ["arm"], ["dominant_ratio", "spectral_entropy", "effective_rank"])
    report.table(f"Empirical Fisher spectrum at the end (last two blocks, {FISHER_PROBES} probe images, all annotations)",
                 spectra)
    by_arm = last.groupby("arm")[["dominant_ratio", "spectral_entropy"]].mean()
    spread = by_arm.loc["image-centric", "spectral_entropy"] > by_arm.loc["decentralized", "spectral_entropy"]
    report.verdict("the image-centric model's Fisher spectrum is less dominated by one direction (lower "
                   "dominant-eigenvalue ratio, higher spectral entropy)",
                   bool(spread and by_arm.loc["image-centric", "dominant_ratio"] < by_arm.loc["decentralized", "dominant_ratio"]),
                   "dominant ratio " + " vs ".join(mean_spread(last[last.arm == a]["dominant_ratio"]) for a in ARMS[:2])
                   + ", entropy " + " vs ".join(mean_spread(last[last.arm == a]["spectral_entropy"]) for a in ARMS[:2]))
    if len(quality):
        columns = [c for c in ("missing", "kept", "coverage", "auc", "acc", "dice", "mae", "map@0.5") if c in quality]
        report.table("Pseudo-label quality against the true labels (kept labels)",
                     summarise(quality, ["task"], columns))
    figures = exp.out / "figures"
    arm_bars(rows, "task", "arm", "value", "test metric (MAE: lower is better)",
             "per-task test metric").savefig(figures / "imax_tasks.png", dpi=100)
    report.figure(figures / "imax_tasks.png", "Test metric per task and arm (bars: mean, lines: sd, dots: seeds)", exp.out)
    fisher_curves(tracks).savefig(figures / "imax_fisher.png", dpi=100)
    report.figure(figures / "imax_fisher.png", "Fisher spectrum summary over training, per arm and seed", exp.out)
    return report
