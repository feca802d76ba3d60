"""An interactive embedding explorer for Jupyter (ipywidgets + a matplotlib canvas, ipympl when present).

Colour the points by any metadata column, switch PCA/UMAP and the features (pooled, per task, per
block), lasso points to see their images, click a point (or type its index) to see it and its
nearest neighbours. Every computation is a :mod:`medexplore.analysis` call; this class only wires
widgets to them, so the same actions are testable without a browser (``select``, ``pick``, ``lasso``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..analysis.embeddings import EmbeddingSet
from ..analysis.projections import project
from ..analysis.selection import nearest_neighbours, nearest_point, points_in_polygon
from .analysis import scatter
from .figures import display_image

__all__ = ["EmbeddingExplorer"]


class EmbeddingExplorer:
    """Explore ``embeddings``; ``images(i)`` returns sample ``i``'s image (C, *spatial) (a dataset works).

    Example (in a notebook, after ``%matplotlib widget``):
        >>> explorer = EmbeddingExplorer(embeddings, dataset)  # doctest: +SKIP
        >>> explorer.widget  # doctest: +SKIP
    """

    def __init__(self, embeddings: EmbeddingSet, images: Callable[[int], object] | Sequence, color_by: str = "modality",
                 method: str = "pca", features: str = "pooled", neighbours: int = 7, max_shown: int = 12,
                 cache=True):
        import ipywidgets as widgets
        import matplotlib.pyplot as plt
        from matplotlib.widgets import LassoSelector

        self.embeddings, self.neighbours, self.max_shown, self.cache = embeddings, neighbours, max_shown, cache
        self._images = images if callable(images) else images.__getitem__
        columns = [c for c in embeddings.metadata.columns if c not in ("index", "patient_id")]
        if color_by not in columns:
            raise KeyError(f"no column {color_by!r} to colour by; columns: {columns}")
        options = ["pooled", *(f"task:{t}" for t in embeddings.tasks)]
        if embeddings.blocks is not None:
            options += [f"block:{i}" for i in range(embeddings.blocks.shape[1])]
        self.color = widgets.Dropdown(options=columns, value=color_by, description="colour by")
        self.method = widgets.ToggleButtons(options=["pca", "umap"], value=method, description="projection")
        self.features = widgets.Dropdown(options=options, value=features, description="features")
        self.index = widgets.BoundedIntText(value=0, min=0, max=len(embeddings) - 1, description="sample")
        self.status = widgets.HTML()
        self.shown = widgets.HTML()  # what the gallery shows, in words: "sample 5 and its 7 nearest neighbours: #5 ..."
        self.gallery = widgets.Output()
        with plt.ioff():
            self.figure = plt.figure(figsize=(6, 5), layout="constrained")
        self.ax = self.figure.add_subplot()
        self.selected: np.ndarray = np.array([], dtype=int)
        self.coords = None
        self._lasso = LassoSelector(self.ax, self.lasso, button=1)  # left drag; right/double click picks
        self.figure.canvas.mpl_connect("button_press_event", self._on_click)
        for control in (self.method, self.features):
            control.observe(lambda change: self.reproject(), names="value")
        self.color.observe(lambda change: self.redraw(), names="value")
        self.index.observe(lambda change: self.pick(change["new"]), names="value")
        if isinstance(self.figure.canvas, widgets.DOMWidget):  # ipympl: the live, clickable canvas
            canvas = self.figure.canvas
        else:  # inline backend: a static picture, redrawn after every change
            canvas = self._static = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.features, self.method]), widgets.HBox([self.color, self.index]),
                                    self.status, widgets.HBox([canvas, widgets.VBox([self.shown, self.gallery])])])
        self.reproject()

    # ------------------------------------------------------------------ actions
    def reproject(self) -> None:
        """Project the chosen features with the chosen method (cached on disk), then redraw."""
        x = self.embeddings.features(self.features.value)
        self.status.value = f"computing {self.method.value.upper()} of {len(x)} points..."
        result = project(x, self.method.value, cache=self.cache)
        self.coords = result.coords
        self.status.value = (f"{self.method.value.upper()} of {self.features.value} ({len(x)} points"
                             f"{', from cache' if result.cached else ''}); lasso to select, right-click to pick")
        self.redraw()

    def redraw(self) -> None:
        """Redraw the scatter with the current colouring and selection."""
        self.ax.clear()
        scatter(self.coords, self.embeddings.metadata, self.color.value, ax=self.ax, highlight=self.selected,
                axis_labels=(f"{self.method.value} 1", f"{self.method.value} 2"))
        self._refresh()

    def select(self, indices) -> np.ndarray:
        """Show the images of ``indices`` (the first ``max_shown``) and ring them in the plot."""
        self.selected = np.asarray(indices, dtype=int)
        self._show(self.selected[:self.max_shown], f"{len(self.selected)} selected")
        self.redraw()
        return self.selected

    def pick(self, index: int) -> np.ndarray:
        """Show sample ``index`` and its nearest neighbours in the current feature space; returns them."""
        near = nearest_neighbours(self.embeddings.features(self.features.value), int(index), self.neighbours)
        self.selected = np.concatenate([[int(index)], near])
        self._show(self.selected, f"sample {index} and its {len(near)} nearest neighbours")
        self.redraw()
        return self.selected

    def lasso(self, vertices) -> np.ndarray:
        """Select the points inside the lasso ``vertices`` (data coordinates); a click (fewer than three
        vertices) keeps the selection, so the pick of a double click stays shown."""
        if len(vertices) < 3:
            return self.selected
        return self.select(points_in_polygon(self.coords, vertices))

    def _on_click(self, event) -> None:
        picking = event.dblclick or event.button == 3  # a double or right click picks; a left drag lassos
        if event.inaxes is not self.ax or not picking:
            return
        span = np.ptp(self.coords, axis=0).max()
        index = nearest_point(self.coords, (event.xdata, event.ydata), max_distance=0.03 * span)
        if index is not None:
            self.index.value = index

    # ------------------------------------------------------------------ drawing
    def _refresh(self) -> None:
        self.figure.canvas.draw_idle()
        if hasattr(self, "_static"):
            from IPython.display import display

            self._static.clear_output(wait=True)
            with self._static:
                display(self.figure)

    def _show(self, indices, title: str) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        meta = self.embeddings.metadata
        n = len(indices)
        cols = min(4, max(n, 1))
        rows = max(1, int(np.ceil(n / cols)))
        with plt.ioff():
            fig = plt.figure(figsize=(1.8 * cols, 1.9 * rows + 0.3), layout="constrained")
        for k, i in enumerate(indices):
            ax = fig.add_subplot(rows, cols, k + 1)
            image = np.asarray(self._image(int(i)))
            if image.ndim == 4:  # a volume: its middle slice
                image = image[:, image.shape[1] // 2]
            ax.imshow(display_image(image), cmap="gray")
            ax.set_title(f"#{i} {meta['modality'].iloc[i]}", fontsize=7)
            ax.set_axis_off()
        fig.suptitle(title, fontsize=9)
        self.shown.value = f"<b>{title}</b>: " + ", ".join(f"#{int(i)} {meta['modality'].iloc[int(i)]}" for i in indices)
        self.gallery.clear_output(wait=True)
        with self.gallery:
            display(fig)
        plt.close(fig)

    def _image(self, i: int):
        item = self._images(i)
        image = getattr(item, "image", item)
        return image.numpy() if hasattr(image, "numpy") else image
