"""MultiMedVision: mixed 2D/3D training with packed (grouped) attention against one padded batch:
the same accuracy, and the time and memory each costs."""
from __future__ import annotations

import time

import pandas as pd
import torch

from ..data.registry import build_dataset
from ..data.sample import collate
from ..errors import UserError
from ..models.kinds import kind_entry
from ..train.checkpoint import load_model
from ..viz.experiments import arm_bars
from .base import Experiment, arm_gaps, task_rows
from .memory import step_memory
from .report import Report, summarise

__all__ = ["packing_vs_padding", "EMBEDDED_VOLUME"]

EMBEDDED_VOLUME = 24  # embedded 3D side for this experiment: 216 tokens per volume against 64 per 2D image
MODES = ("grouped", "padded")


def _step_cost(model, batch, packing: str, repeats: int = 5) -> dict:
    """Median seconds of a forward + backward pass and the bytes autograd keeps, for one packing."""
    model.train()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = model(batch, packing=packing)
        model.compute_loss(out, batch)[0].backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    memory = step_memory(model, batch, packing=packing)
    return {"step_seconds": sorted(times[1:])[repeats // 2], "activation_mb": memory["activations"] / 2 ** 20}


def packing_vs_padding(exp: Experiment) -> Report:
    data = {"volume_size": EMBEDDED_VOLUME} if exp.settings.datasets == ["embedded"] else {}
    tasks = exp.tasks(data)
    per_image = [t.name for t in tasks if kind_entry(t.kind).output == "vector"]
    if per_image and len(per_image) < len(tasks):  # dense decoders run per sample either way: leave them out
        data["keep_tasks"] = per_image
    train_set = build_dataset({**exp.settings.data, **data}, "train")
    shapes = {tuple(train_set[i].image.shape[1:]) for i in range(0, len(train_set), max(1, len(train_set) // 64))}
    if len({len(s) for s in shapes}) < 2:
        raise UserError(f"packing compares mixed 2D/3D batches; {exp.settings.datasets} hold only {shapes}")
    several = len(exp.settings.datasets) > 1
    rows, costs = [], []
    g = torch.Generator().manual_seed(0)
    probe = [train_set[i] for i in torch.randperm(len(train_set), generator=g)[:32].tolist()]
    for seed in exp.settings.seeds:
        for mode in MODES:
            train = {"packing": mode, **({"balance": "source"} if several else {})}
            outcome = exp.train(f"{mode}-seed{seed}", exp.config(seed, data=data, train=train))
            rows += task_rows(outcome, arm=mode, seed=seed)
            model, _ = load_model(outcome["checkpoint"])
            costs.append({"arm": mode, "seed": seed, "train_seconds": outcome["seconds"],
                          **_step_cost(model, collate(probe), mode)})
    return _report(exp, pd.DataFrame(rows), pd.DataFrame(costs), shapes)


def _report(exp: Experiment, rows: pd.DataFrame, costs: pd.DataFrame, shapes: set) -> Report:

    rows.to_csv(exp.out / "metrics.csv", index=False)
    costs.to_csv(exp.out / "costs.csv", index=False)
    report = Report("Packed against padded mixed 2D/3D training",
                    f"Data {exp.settings.datasets} (image shapes {sorted(shapes)}), budget `{exp.settings.budget}`, "
                    f"seeds {list(exp.settings.seeds)}. Both arms train the same model with the same recipe on the "
                    "per-image tasks (segmentation and detection decoders run per sample under either packing, "
                    "and their 3D convolutions would dominate the step); "
                    "`grouped` packs samples of similar token count into compact attention segments, `padded` "
                    "pads every sample to the batch's longest sequence. Test split.")
    table = summarise(rows, ["task", "metric", "arm"], ["value"]).pivot(index=["task", "metric"], columns="arm",
                                                                      values="value").reset_index()
    gaps = arm_gaps(rows, ["task", "metric"], "grouped", "padded", floor=0.01).set_index(["task", "metric"])
    table["grouped - padded"] = [gaps.loc[key, "gain"] for key in zip(table["task"], table["metric"])]
    report.table("Test metric per task (mean ± sd over seeds)", table)
    within = int((gaps.outcome == 0).sum())
    report.verdict("packing loses no accuracy (MultiMedVision)",
                   bool(within >= len(gaps) / 2 and gaps.gain.mean() >= -0.01),
                   f"{within} of {len(gaps)} tasks within the seed spread (or 0.01), mean difference {gaps.gain.mean():+.4f}")
    cost = summarise(costs, ["arm"], ["train_seconds", "step_seconds", "activation_mb"], digits=3)
    by = costs.groupby("arm").mean(numeric_only=True)
    time_ratio = by.loc["padded", "step_seconds"] / by.loc["grouped", "step_seconds"]
    memory_ratio = by.loc["padded", "activation_mb"] / by.loc["grouped", "activation_mb"]
    report.table("Cost", cost, "step_seconds: median forward + backward of the same 32 training images; "
                 "activation_mb: tensors autograd keeps for that step (exact, device-independent).")
    report.verdict("packing is cheaper than padding", bool(time_ratio > 1 and memory_ratio > 1),
                   f"padded / grouped: step time {time_ratio:.2f}x, activation memory {memory_ratio:.2f}x, "
                   f"whole training {by.loc['padded', 'train_seconds'] / by.loc['grouped', 'train_seconds']:.2f}x")
    figure = exp.out / "figures" / "packing_tasks.png"
    arm_bars(rows, "task", "arm", "value", "test metric (MAE: lower is better)", "grouped vs padded").savefig(figure, dpi=100)
    report.figure(figure, "Test metric per task, packed (grouped) and padded", exp.out)
    return report
