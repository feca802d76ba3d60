"""MTMed3D / Medformer: one multitask model against one model per task on the same data and recipe,
with the task-loss balancing options; metric per task, parameters, training and inference time."""
from __future__ import annotations

import pandas as pd

from ..errors import UserError
from ..train.balancing import LOSS_BALANCES
from ..train.checkpoint import final_checkpoint
from ..viz.experiments import arm_bars
from .base import Experiment, arm_gaps, inference_ms, task_rows
from .report import Report, summarise

__all__ = ["multitask_vs_single"]


def multitask_vs_single(exp: Experiment) -> Report:
    tasks = exp.tasks()
    if len(tasks) < 2:
        raise UserError(f"multitask-vs-single needs at least two tasks; {exp.settings.datasets} have "
                         f"{[t.name for t in tasks]}")
    rows, costs = [], []
    for seed in exp.settings.seeds:
        for arm, key, train in multitask_arms(exp):
            outcome = exp.train(f"{key}-seed{seed}", exp.config(seed, train=train))
            rows += task_rows(outcome, arm=arm, seed=seed)
            costs.append({"arm": arm, "seed": seed, "parameters": outcome["parameters"],
                          "train_seconds": outcome["seconds"], "inference_ms_per_image": inference_ms(exp, outcome)})
        single = {"arm": "single-task (all)", "seed": seed, "parameters": 0, "train_seconds": 0.0,
                  "inference_ms_per_image": 0.0}
        for task in tasks:
            outcome = exp.train(f"single-{task.name}-seed{seed}", exp.config(seed, data={"keep_tasks": [task.name]}))
            rows += task_rows(outcome, arm="single-task", seed=seed)
            single["parameters"] += outcome["parameters"]
            single["train_seconds"] += outcome["seconds"]
            single["inference_ms_per_image"] += inference_ms(exp, outcome)
        costs.append(single)
    return _report(exp, pd.DataFrame(rows), pd.DataFrame(costs))


def multitask_arms(exp: Experiment) -> list[tuple[str, str, dict]]:
    """(arm, run key, train changes) of the multitask models: one per loss balance with the recipe's steps;
    with several datasets (each seen ~1/N of the time) also one with N times the steps, so that every dataset
    is seen as often as by its single-task model."""
    datasets = len(exp.settings.datasets)
    source = {"balance": "source"} if datasets > 1 else {}
    arms = [(f"multitask ({b})", f"multitask-{b}", {"loss_balance": b, **source}) for b in LOSS_BALANCES]
    if datasets > 1:
        steps = exp.settings.recipe["train"]["steps_per_epoch"] * datasets
        arms.append((f"multitask (fixed, {datasets}x steps)", "multitask-fixed-equal-exposure",
                     {"loss_balance": "fixed", "steps_per_epoch": steps, **source}))
    return arms


def _report(exp: Experiment, rows: pd.DataFrame, costs: pd.DataFrame) -> Report:

    rows.to_csv(exp.out / "metrics.csv", index=False)
    costs.to_csv(exp.out / "costs.csv", index=False)
    report = Report("Multitask against single-task models",
                    f"Data {exp.settings.datasets}, budget `{exp.settings.budget}`, seeds {list(exp.settings.seeds)}. "
                    "One model learns every task at once (task losses combined by fixed weights, uncertainty "
                    "weighting or GradNorm); each single-task model learns one task on the images that carry it. "
                    "Every run uses the same recipe and number of steps"
                    + (" (the multitask model trained with N times the steps sees each of the N datasets as "
                       "often as its single-task model)" if len(exp.settings.datasets) > 1 else "") + ". Test split.")
    table = summarise(rows, ["task", "metric", "arm"], ["value"]).pivot(index=["task", "metric"], columns="arm",
                                                                      values="value").reset_index()
    report.table("Test metric per task (mean ± sd over seeds; MAE: lower is better)", table)
    verdicts = []
    for arm, _, _ in multitask_arms(exp):
        gaps = arm_gaps(rows, ["task", "metric"], arm, "single-task")
        verdicts.append((arm, int((gaps.outcome >= 0).sum()), int((gaps.gain >= 0).sum()), len(gaps)))
    best = max(verdicts, key=lambda v: v[1])
    report.verdict("one multitask model matches or beats single-task models (Medformer: 14 of 18 MedMNIST datasets)",
                   best[1] >= best[3] / 2,
                   "; ".join(f"{arm}: {k} of {n} tasks ({m} with the mean at or above)" for arm, k, m, n in verdicts)
                   + " (match: multitask not behind single-task by more than the larger seed sd)")
    cost = summarise(costs, ["arm"], ["parameters", "train_seconds", "inference_ms_per_image"], digits=1)
    report.table("Cost (single-task: all task models together)", cost,
                 "Inference: forward pass of up to 64 test images in batches of 32 (fastest of three passes after a "
                 "warm-up batch, synchronised on CUDA); the single-task figure runs every task's model. Training "
                 "time includes validation after every epoch.")
    by_arm = costs.groupby("arm")[["parameters", "train_seconds", "inference_ms_per_image"]].mean()
    ratio = by_arm / by_arm.loc["single-task (all)"]  # each arm's cost as a multiple of all single-task models'
    fixed = ratio.loc["multitask (fixed)"]
    longer = [arm for arm, _, train in multitask_arms(exp) if "steps_per_epoch" in train]
    report.verdict("multitask costs less than one model per task (parameters, training and inference time)",
                   bool(fixed["parameters"] < 1 and fixed["inference_ms_per_image"] < 1),
                   f"parameters {fixed['parameters']:.2f}x, training time {fixed['train_seconds']:.2f}x, inference "
                   f"{fixed['inference_ms_per_image']:.2f}x of the single-task models'"
                   + "".join(f"; {arm}: training time {ratio.loc[arm, 'train_seconds']:.2f}x" for arm in longer))
    figure = exp.out / "figures" / "multitask_tasks.png"
    arm_bars(rows, "task", "arm", "value", "test metric (MAE: lower is better)", "per-task test metric").savefig(
        figure, dpi=100)
    report.figure(figure, "Test metric per task: the multitask arms against single-task models", exp.out)
    weights = _loss_weights(exp, rows)
    if len(weights):
        report.table("Learned task-loss weights at the end (uncertainty: exp(-s); GradNorm: w)", weights)
    return report


def _loss_weights(exp: Experiment, rows: pd.DataFrame) -> pd.DataFrame:
    import json

    out = []
    for balance in ("uncertainty", "gradnorm"):
        for seed in exp.settings.seeds:
            meta = final_checkpoint(exp.run_dir(f"multitask-{balance}-seed{seed}")) / "meta.json"
            if meta.exists():
                for task, w in json.loads(meta.read_text()).get("loss_weights", {}).items():
                    out.append({"balance": balance, "task": task, "seed": seed, "weight": w})
    if not out:
        return pd.DataFrame()
    return summarise(pd.DataFrame(out), ["balance", "task"], ["weight"])
