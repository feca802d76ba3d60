"""Matplotlib canvases docked in napari (Qt agg backend through qtpy); figures come from ``medexplore.viz``."""
from __future__ import annotations

import time

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure

from medexplore.models.kinds import headline_of


class MplCanvas:
    """A figure with a Qt canvas; ``native`` is the QWidget to add to a layout."""

    def __init__(self, size=(4.5, 3.2), layout: str | None = "constrained"):
        self.figure = Figure(figsize=size, layout=layout)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(int(size[1] * 80))

    @property
    def native(self):
        return self.canvas

    def draw(self) -> None:
        self.canvas.draw_idle()


class CurvesCanvas(MplCanvas):
    """Live training loss per step and the headline validation metric per task per epoch.

    A full draw holds the GUI thread for a noticeable time (docs/measurements.md), so the plot is redrawn at most every
    ``min_interval_s`` (and always for a new validation point), with a fixed layout instead of a solved one.
    """

    def __init__(self, min_interval_s: float = 3.0):
        super().__init__((4.5, 3.6), layout=None)
        self.figure.subplots_adjust(left=0.16, right=0.97, top=0.97, bottom=0.11, hspace=0.45)
        self.ax_loss, self.ax_val = self.figure.subplots(2, 1)
        self.min_interval_s = min_interval_s
        self._drawn_at, self._evals_drawn = 0.0, 0
        self.clear()

    def clear(self) -> None:
        for ax in (self.ax_loss, self.ax_val):
            ax.clear()
        self.ax_loss.set(xlabel="step", ylabel="training loss", yscale="log")
        self.ax_val.set(xlabel="epoch", ylabel="validation")
        self.draw()

    def update(self, events, force: bool = False) -> None:
        evals = [e for e in events if e.kind == "eval" and e.metrics]
        now = time.monotonic()
        if not force and len(evals) == self._evals_drawn and now - self._drawn_at < self.min_interval_s:
            return
        self._drawn_at, self._evals_drawn = now, len(evals)
        steps = [(e.step, e.losses["loss"]) for e in events if e.kind == "step" and "loss" in e.losses]
        self.ax_loss.clear()
        if steps:
            x, y = np.array(steps).T
            self.ax_loss.plot(x, y, lw=0.8, color="#0072B2")
        self.ax_loss.set(xlabel="step", ylabel="training loss", yscale="log" if steps and min(y) > 0 else "linear")
        self.ax_val.clear()
        for task in sorted({t for e in evals for t in e.metrics}):
            metric = headline_of([e.metrics.get(task, {}) for e in evals])
            if metric:
                self.ax_val.plot([e.epoch for e in evals], [e.metrics.get(task, {}).get(metric, np.nan) for e in evals],
                                 marker="o", ms=3, label=f"{task} ({metric})")
        if evals:
            self.ax_val.legend(fontsize=6, frameon=False)
        self.ax_val.set(xlabel="epoch", ylabel="validation")
        self.draw()
