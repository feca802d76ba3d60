"""Figures of experiment reports: per-task bars of each arm, metric against label fraction (mean ± sd over seeds)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .analysis import category_colors

__all__ = ["arm_bars", "fraction_lines"]


def arm_bars(rows: pd.DataFrame, group: str, arm: str, value: str, ylabel: str, title: str = "") -> Figure:
    """One bar group per ``group`` value (e.g. task), one bar per ``arm``, height the mean of ``value``
    over the rows (seeds), error bars one standard deviation, each seed a dot."""
    groups = list(dict.fromkeys(rows[group]))
    arms = list(dict.fromkeys(rows[arm]))
    fig = Figure(figsize=(max(5.0, 1.1 * len(groups) * len(arms) / 2 + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(arms)
    colors = category_colors(arms)
    for k, name in enumerate(arms):
        x = np.arange(len(groups)) + (k - (len(arms) - 1) / 2) * width
        cells = [rows[(rows[group] == g) & (rows[arm] == name)][value].astype(float) for g in groups]
        means = [c.mean() if len(c) else np.nan for c in cells]
        stds = [c.std(ddof=1) if len(c) > 1 else 0.0 for c in cells]
        ax.bar(x, means, width, yerr=stds, color=colors[name], label=str(name), capsize=2)
        for xi, c in zip(x, cells):
            ax.plot(np.full(len(c), xi), c, "k.", ms=3)
    metric = (rows.groupby(group)["metric"].first() if "metric" in rows else {})
    labels = [f"{g}\n({metric[g]})" if g in metric else str(g) for g in groups]
    ax.set_xticks(np.arange(len(groups)), labels, rotation=20, ha="right")
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8, frameon=False)
    return fig


def fraction_lines(rows: pd.DataFrame, fraction: str, arm: str, value: str, panel: str, ylabel: str) -> Figure:
    """One panel per ``panel`` value (task), ``value`` against ``fraction`` (log axis), one line per ``arm``
    with a band of one standard deviation over the rows (seeds)."""
    panels = list(dict.fromkeys(rows[panel]))
    fig = Figure(figsize=(3.4 * len(panels), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    colors = category_colors(list(dict.fromkeys(rows[arm])))
    for ax, name in zip(axes, panels):
        part = rows[rows[panel] == name]
        for a, color in colors.items():
            stats = part[part[arm].astype(str) == a].groupby(fraction)[value].agg(["mean", "std"]).fillna(0.0)
            ax.plot(stats.index, stats["mean"], marker="o", ms=4, color=color, label=a)
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], color=color, alpha=0.2)
        ax.set_xscale("log")
        metric = f" ({part['metric'].iloc[0]})" if "metric" in part and len(part) else ""
        ax.set(xlabel="fraction of training labels", ylabel=ylabel, title=f"{name}{metric}")
    axes[0].legend(fontsize=8, frameon=False)
    return fig
