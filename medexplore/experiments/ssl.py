"""Medformer: VICReg pretraining against training from scratch with 1%, 10% and 100% of the labels,
on the tasks with the fewest labels."""
from __future__ import annotations

import pandas as pd

from ..data.registry import build_dataset, dataset_parts, dataset_tasks
from ..data.sampling import labels_of
from ..viz.experiments import fraction_lines
from .base import Experiment, arm_gaps, spread_verdict, task_rows
from .report import Report, summarise

__all__ = ["ssl_benefit", "LABEL_FRACTIONS", "SCARCE_TASKS"]

LABEL_FRACTIONS = (0.01, 0.1, 1.0)
SCARCE_TASKS = 2  # how many of the tasks with the fewest training labels are compared


def scarce_tasks(exp: Experiment, k: int = SCARCE_TASKS) -> list[str]:
    """The ``k`` tasks with the fewest training labels (ties: the tasks' order)."""
    train = build_dataset(exp.settings.data, "train")
    counts = {t.name: 0 for t in dataset_tasks(train)}
    for i in range(len(train)):
        for task in labels_of(train, i):
            counts[task] = counts.get(task, 0) + 1
    return sorted(counts, key=counts.get)[:k]


def ssl_benefit(exp: Experiment) -> Report:
    tasks = scarce_tasks(exp)
    several = len(exp.settings.datasets) > 1
    rows = []
    for seed in exp.settings.seeds:
        pretrained = exp.train(f"vicreg-seed{seed}", exp.pretrain_config(seed), mode="vicreg")
        for fraction in LABEL_FRACTIONS:
            data = {"keep_tasks": tasks, "label_fraction": fraction, "subset_seed": seed}
            train = {"balance": "source"} if several and len(dataset_parts(
                build_dataset({**exp.settings.data, **data}, "train"))) > 1 else {}
            for init in ("scratch", "vicreg"):
                outcome = exp.train(f"{init}-{fraction:g}-seed{seed}", exp.config(seed, data=data, train=train),
                                    init=pretrained["checkpoint"] if init == "vicreg" else None)
                rows += task_rows(outcome, arm=init, seed=seed, fraction=fraction)
    return _report(exp, pd.DataFrame(rows), tasks)


def _report(exp: Experiment, rows: pd.DataFrame, tasks: list[str]) -> Report:

    rows.to_csv(exp.out / "metrics.csv", index=False)
    report = Report("Self-supervised pretraining (VICReg) against training from scratch",
                    f"Data {exp.settings.datasets}, budget `{exp.settings.budget}`, seeds {list(exp.settings.seeds)}. "
                    f"Tasks with the fewest training labels: {tasks}. VICReg pretrains on every training image "
                    "(no labels); both arms then train on a seeded share of the labelled images "
                    f"({', '.join(f'{f:g}' for f in LABEL_FRACTIONS)}) with the same recipe and steps. Test split.")
    table = summarise(rows, ["task", "metric", "fraction", "arm"], ["value"]).pivot(
        index=["task", "metric", "fraction"], columns="arm", values="value").reset_index()
    gaps = arm_gaps(rows, ["task", "metric", "fraction"], "vicreg", "scratch").set_index(["task", "metric", "fraction"])
    table["vicreg - scratch"] = [gaps.loc[key, "gain"] for key in zip(table["task"], table["metric"], table["fraction"])]
    table["fraction"] = table["fraction"].map(lambda f: f"{f:.0%}")
    report.table("Test metric (mean ± sd over seeds; for MAE the gain's sign is flipped)", table)
    few, full = gaps[gaps.index.get_level_values("fraction") < 1], gaps[gaps.index.get_level_values("fraction") == 1]
    helps = spread_verdict(few["outcome"])
    report.verdict("VICReg pretraining helps the data-scarce tasks when labels are few (fractions below 1)", helps,
                   f"ahead by more than the seed sd in {(few.outcome > 0).sum()} of {len(few)} task x fraction cells "
                   f"below 100%, behind by more in {(few.outcome < 0).sum()}; mean gain {few.gain.mean():+.3f}")
    shrinks = bool(full.gain.mean() < few.gain.mean()) if len(full) and len(few) else None
    report.verdict("with all labels the gain shrinks", shrinks if helps is True or shrinks is None else "not shown",
                   f"mean gain {full.gain.mean():+.3f} at 100% vs {few.gain.mean():+.3f} below"
                   + ("" if helps is True else "; no gain below 100% beyond the seed spread to shrink"))
    figure = exp.out / "figures" / "ssl_fractions.png"
    fraction_lines(rows, "fraction", "arm", "value", "task", "test metric").savefig(figure, dpi=100)
    report.figure(figure, "Test metric against the share of labels: VICReg-initialised vs from scratch (band: sd)",
                  exp.out)
    return report
