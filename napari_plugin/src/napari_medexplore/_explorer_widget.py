"""Embedding explorer: a checkpoint's embeddings of a dataset (or of the open image layers) as a scatter.

PCA is drawn as soon as the embeddings exist; UMAP runs in a worker and is swapped in when ready. Hover
shows a point's image in the viewer, a lasso opens the selected images as a stack layer, and moving
through that stack highlights the point of the image shown. Embeddings, projections and selections are
``medexplore.analysis`` functions; the scatter is ``medexplore.viz.scatter``.
"""
from __future__ import annotations

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, ProgressBar, PushButton
from matplotlib.widgets import LassoSelector

from medexplore.analysis.embeddings import iter_compute_embeddings
from medexplore.analysis.projections import project
from medexplore.analysis.selection import nearest_point, points_in_polygon
from medexplore.data.embedded import EmbeddedDataset
from medexplore.data.sample import Sample
from medexplore.data.transforms import prepare_image
from medexplore.errors import UserError
from medexplore.viz.analysis import scatter

from ._common import CheckpointPicker, compute_worker, image_layers, report_error, start_worker
from ._layers import layer_domain, layer_image
from ._plots import MplCanvas

SOURCES = ("embedded test", "embedded val", "embedded train", "open image layers", "every image of the visible layers")
HOVER_LAYER = "medexplore: hovered sample"
STACK_KEY = "medexplore_explorer_indices"


def _own_layers(viewer, visible_only: bool) -> list:
    return [layer for layer in image_layers(viewer) if not layer.name.startswith(HOVER_LAYER)
            and STACK_KEY not in layer.metadata and (layer.visible or not visible_only)]


def layer_samples(viewer, patch_sizes: dict[int, int], every_image: bool = False, tasks=()) -> list[Sample]:
    """The viewer's image layers as samples (normalised per modality, padded to whole patches): the image each
    layer shows, or with ``every_image`` every image of every visible layer's stack (a MedMNIST split opened
    by the reader: each image keeps its index and, for a task in ``tasks``, its label)."""
    samples = []
    for layer in _own_layers(viewer, visible_only=every_image):
        domain = layer_domain(layer)
        steps = [viewer.dims.current_step]
        if every_image:
            lead_ndim = layer.ndim - (2 if domain.dimensionality == "2d" else 3)
            steps = list(np.ndindex(*layer.data.shape[:lead_ndim])) if lead_ndim > 0 else [()]
        features = layer.metadata.get("features")
        task = layer.metadata.get("medmnist")
        for step in steps:
            image, lead = layer_image(layer, domain, step)
            index = lead[0] if len(lead) == 1 else 0
            labels = {}
            if every_image and task in tasks and features is not None and "label" in features:
                labels[task] = int(features["label"].iloc[index])
            samples.append(Sample(prepare_image(image, domain, pad_to=patch_sizes), domain, labels,
                                  meta={"source": layer.name, "index": index}))
    if not samples:
        raise UserError("no image layers to embed" + (" (only visible layers count)" if every_image else ""))
    return samples


class ScatterCanvas(MplCanvas):
    """The scatter, drawn in full only when it changes; the highlight is blitted over a saved background
    (a full redraw of many points is slow, a blit is not: docs/measurements.md)."""

    def __init__(self):
        super().__init__((4.5, 4.0))
        self.ax = self.figure.subplots()
        self.highlight = None  # the hovered / shown point
        self.selection = None  # the lasso's points
        self.lasso = None
        self.background = None
        self.canvas.mpl_connect("draw_event", self._on_draw)

    def _overlays(self) -> list:
        return [a for a in (self.selection, self.highlight) if a is not None]

    def _on_draw(self, _event=None) -> None:
        self.background = self.canvas.copy_from_bbox(self.ax.bbox)
        for artist in self._overlays():
            self.ax.draw_artist(artist)

    def _blit(self) -> None:
        if self.background is None:
            self.canvas.draw_idle()
            return
        self.canvas.restore_region(self.background)
        for artist in self._overlays():
            self.ax.draw_artist(artist)
        self.canvas.blit(self.ax.bbox)

    def show_highlight(self, points: np.ndarray) -> None:
        if self.highlight is not None:
            self.highlight.set_data(points[:, 0], points[:, 1])
            self._blit()

    def show_selection(self, points: np.ndarray) -> None:
        if self.selection is not None:
            self.selection.set_data(points[:, 0], points[:, 1])
            self._blit()


class ExplorerWidget(Container):
    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.projections: dict[str, np.ndarray] = {}
        self._columns: list[str] = []
        self.checkpoint = CheckpointPicker()
        self.source = ComboBox(label="embed", choices=SOURCES, value=SOURCES[0])
        self.compute_button = PushButton(text="Compute embeddings")
        # choices are read from the widget's state: napari re-reads them whenever layers change
        self.method = ComboBox(label="projection", choices=lambda _w: list(self.projections) or ["pca"])
        self.color_by = ComboBox(label="colour by", choices=lambda _w: self._columns, nullable=True)
        self.progress = ProgressBar(label="progress", value=0, max=1)
        self.status = Label(value="")
        self.plot = ScatterCanvas()
        super().__init__(widgets=[self.checkpoint, self.source, self.compute_button, self.method, self.color_by,
                                  self.progress, self.status])
        self.native.layout().addWidget(self.plot.native)
        self.embeddings = None
        self._updating = False
        self.samples = None  # what the points are images of
        self.selected = np.zeros(0, dtype=int)
        self.workers = []
        self.compute_button.changed.connect(self.compute)
        self.method.changed.connect(self.redraw)
        self.color_by.changed.connect(self.redraw)
        self.plot.canvas.mpl_connect("motion_notify_event", self._on_hover)
        self.plot.canvas.mpl_connect("button_press_event", self._on_click)
        self.viewer.dims.events.current_step.connect(self._on_step)

    # ------------------------------------------------------------------ computing
    def _dataset(self, model):
        if self.source.value in SOURCES[3:]:
            return layer_samples(self.viewer, model.config.patch_sizes, every_image=self.source.value == SOURCES[4],
                                 tasks=list(model.tasks))
        return EmbeddedDataset(self.source.value.split()[1])

    def compute(self, _value=None):
        """Embed in a worker; returns it (None when the input was refused)."""
        try:
            model, _ = self.checkpoint.load()
            dataset = self._dataset(model)
            steps = iter_compute_embeddings(model, dataset)
        except Exception as exc:
            self.status.value = report_error(exc, "embedding")
            return None

        @compute_worker
        def work():  # yields (done, total) after every batch; returns the EmbeddingSet
            return (yield from steps)

        worker = work()
        worker.yielded.connect(lambda step: (setattr(self.progress, "max", step[1]), setattr(self.progress, "value", step[0])))
        worker.returned.connect(lambda embeddings: self.show_embeddings(embeddings, dataset))
        worker.errored.connect(lambda exc: setattr(self.status, "value", report_error(exc, "embedding")))
        self.status.value = f"embedding {len(dataset)} images..."
        self.workers.append(worker)
        start_worker(worker)
        return worker

    def show_embeddings(self, embeddings, samples=None):
        """Draw PCA now and start UMAP in a worker (returned, so tests can wait on it)."""
        self.embeddings, self.samples = embeddings, samples
        self.projections = {"pca": project(embeddings.pooled, "pca").coords}
        self._updating = True  # one redraw at the end, not one per field set
        self.method.reset_choices()
        columns = [c for c in embeddings.metadata.columns if embeddings.metadata[c].nunique(dropna=True) > 1]
        self._columns = columns
        self.color_by.reset_choices()
        preferred = [c for c in ("modality", "dataset", "dimensionality") if c in columns]
        self.color_by.value = preferred[0] if preferred else None
        self.selected = np.zeros(0, dtype=int)
        self._updating = False
        self.redraw()
        self.status.value = f"{len(embeddings.pooled)} points: PCA shown, UMAP computing..."

        @compute_worker
        def fit_umap():
            return project(embeddings.pooled, "umap").coords

        from qtpy.QtCore import QTimer

        worker = fit_umap()
        worker.returned.connect(self._on_umap)
        worker.errored.connect(lambda exc: setattr(self.status, "value", report_error(exc, "UMAP")))
        self.workers.append(worker)
        QTimer.singleShot(0, lambda: start_worker(worker))  # after the PCA view is on screen, not competing with its paint
        return worker

    def _on_umap(self, coords) -> None:
        self.projections["umap"] = coords
        self._updating = True
        self.method.reset_choices()
        self.method.value = "umap"
        self._updating = False
        self.redraw()
        self.status.value = f"{len(coords)} points: UMAP ready"

    # ------------------------------------------------------------------ drawing and linking
    @property
    def coords(self) -> np.ndarray:
        return self.projections[self.method.value]

    def redraw(self, _value=None) -> None:
        if self.embeddings is None or self._updating:
            return
        ax = self.plot.ax
        ax.clear()
        method = self.method.value
        scatter(self.coords, self.embeddings.metadata, self.color_by.value, ax=ax, title=method.upper(),
                axis_labels=(f"{method} 1", f"{method} 2"), legend_loc="upper right")
        (self.plot.selection,) = ax.plot(*self.coords[self.selected, :2].T, "o", ms=5, mfc="none", mec="black",
                                         mew=0.6, animated=True)
        (self.plot.highlight,) = ax.plot([], [], "o", ms=12, mfc="none", mec="black", mew=1.5, animated=True)
        self.plot.lasso = LassoSelector(ax, self._on_lasso, useblit=True)
        self.plot.canvas.draw()

    def _show_highlight(self, index: int | None = None) -> None:
        self.plot.show_highlight(self.coords[[index]] if index is not None else np.zeros((0, 2)))

    def _pick(self, event) -> int | None:
        if self.embeddings is None or event.inaxes is not self.plot.ax or event.xdata is None:
            return None
        span = np.ptp(self.coords[:, :2], axis=0).max() or 1.0
        return nearest_point(self.coords, (event.xdata, event.ydata), max_distance=0.02 * span)

    def sample_image(self, index: int) -> np.ndarray | None:
        if self.samples is None:
            return None
        image = self.samples[index].image.numpy()
        return image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)

    def show_point(self, index: int) -> None:
        """Show point ``index``'s image in the hover layer and its metadata in the status line."""
        row = self.embeddings.metadata.iloc[index]
        self.status.value = ", ".join(f"{k}={row[k]}" for k in list(row.index)[:6])
        image = self.sample_image(index)
        if image is None:
            return
        rgb = image.ndim == 3 and image.shape[-1] == 3 and row.get("dimensionality") == "2d"
        name = f"{HOVER_LAYER} ({'x'.join(map(str, image.shape))})"  # one per shape: updated, never re-created
        for layer in self.viewer.layers:
            if layer.name.startswith(HOVER_LAYER) and layer.name != name and layer.visible:
                layer.visible = False
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = image
            layer.visible = True
            if not rgb:
                layer.reset_contrast_limits()
        else:
            self.viewer.add_image(image, name=name, rgb=rgb)
        self._show_highlight(index)

    def _on_hover(self, event) -> None:
        index = self._pick(event)
        if index is not None:
            self.show_point(index)

    def _on_click(self, event) -> None:
        index = self._pick(event)
        if index is not None and event.button == 3:  # right click keeps the point's image as its own layer
            self.open_stack(np.array([index]))

    def _on_lasso(self, vertices) -> None:
        self.select(np.flatnonzero(points_in_polygon(self.coords, vertices)))

    def select(self, indices: np.ndarray) -> None:
        """Mark ``indices`` on the plot at once; their images open as a stack right after (next event-loop turn)."""
        from qtpy.QtCore import QTimer

        self.selected = np.asarray(indices, dtype=int)
        self.plot.show_selection(self.coords[self.selected, :2])
        self.status.value = f"{len(self.selected)} selected; opening their images..."
        if len(self.selected):
            QTimer.singleShot(0, lambda chosen=self.selected: self.open_stack(chosen))

    def open_stack(self, indices: np.ndarray):
        """The images of ``indices`` (those sharing the first one's shape) as one stack layer."""
        images = [self.sample_image(int(i)) for i in indices] if self.samples is not None else []
        if not images:
            self.status.value = f"{len(indices)} selected (no images: embeddings loaded without their dataset)"
            return None
        shape = images[0].shape
        keep = [int(i) for i, image in zip(indices, images) if image.shape == shape]
        stack = np.stack([image for image in images if image.shape == shape])
        rgb = stack.ndim == 4 and shape[-1] == 3
        meta = {STACK_KEY: keep, "features": self.embeddings.metadata.iloc[keep].reset_index(drop=True)}
        layer = self.viewer.add_image(stack, name=f"selection ({len(keep)})", rgb=rgb, metadata=meta)
        self.status.value = f"{len(indices)} selected; {len(keep)} of shape {shape} opened as a stack"
        return layer

    def _on_step(self, _event=None) -> None:
        layer = self.viewer.layers.selection.active
        if layer is None or STACK_KEY not in layer.metadata or self.embeddings is None:
            return
        position = int(self.viewer.dims.current_step[0])
        indices = layer.metadata[STACK_KEY]
        if 0 <= position < len(indices):
            self._show_highlight(indices[position])
