"""The adaptation benchmark's figure: test AUC per strategy, prompt scaling, AUC against trainable parameters."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .analysis import category_colors

__all__ = ["plot_adapt_bench"]


def plot_adapt_bench(table: pd.DataFrame) -> Figure:
    """Three panels from ``adapt-bench``'s results table (standard protocol; the sweep's ``vpt_deep`` rows
    feed the middle panel)."""
    standard = table[table["protocol"] == "standard"]
    datasets = list(dict.fromkeys(standard["dataset"]))
    colors = category_colors(datasets)
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    bars, sweep, cost = fig.subplots(1, 3)
    main = standard.drop_duplicates(["dataset", "strategy"], keep="first")
    strategies = list(dict.fromkeys(main["strategy"]))
    width = 0.8 / max(len(datasets), 1)
    for k, name in enumerate(datasets):
        rows = main[main["dataset"] == name].set_index("strategy").reindex(strategies)
        bars.bar(np.arange(len(strategies)) + (k - (len(datasets) - 1) / 2) * width, rows["auc"], width,
                 label=name, color=colors[name])
    bars.set_xticks(range(len(strategies)), strategies, rotation=35, ha="right")
    bars.set_ylabel("test AUC (mean over tasks)")
    bars.set_ylim(0.4, 1.0)
    bars.axhline(0.5, color="#999999", lw=0.8, ls=":")
    bars.set_title("strategy")
    bars.legend(loc="upper left", fontsize=8, ncol=len(datasets))
    for name in datasets:
        rows = standard[(standard["dataset"] == name) & (standard["strategy"] == "vpt_deep")].sort_values("prompts")
        if len(rows) > 1:
            sweep.plot(rows["prompts"], rows["auc"], "o-", color=colors[name], label=name)
    sweep.set_xscale("log")
    sweep.set_xlabel("prompt tokens (VPT-deep)")
    sweep.set_ylabel("test AUC")
    sweep.set_title("prompt scaling")
    if sweep.get_legend_handles_labels()[0]:
        sweep.legend(fontsize=8)
    else:
        sweep.text(0.5, 0.5, "no prompt sweep in this run", ha="center", va="center", transform=sweep.transAxes)
    for name in datasets:
        rows = main[main["dataset"] == name]
        cost.scatter(rows["backbone_trainable"], rows["auc"], color=colors[name], label=name)
        for _, r in rows.iterrows():
            cost.annotate(r["strategy"], (r["backbone_trainable"], r["auc"]), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
    cost.set_xscale("symlog", linthresh=100)
    cost.set_xlabel("trainable backbone parameters (task side excluded)")
    cost.set_ylabel("test AUC")
    cost.set_title("accuracy against cost")
    return fig
