"""Run a checkpoint on an image layer: segmentation, classification, detection, attention and attributions.

The work is ``medexplore.analysis.inference.iter_infer_image`` in a napari worker (``_common.compute_worker``);
this widget only gathers the choices, shows progress and places the results (``_layers.result_layers``).
"""
from __future__ import annotations

import psutil
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, ProgressBar, PushButton, SpinBox, Table

from medexplore.analysis.attribution import ATTRIBUTION_LABELS
from medexplore.analysis.inference import estimate_inference_memory, iter_infer_image, window_for
from medexplore.errors import UserError
from medexplore.models.kinds import kind_entry

from ._common import DEVICES, CheckpointPicker, DomainFields, compute_worker, image_layers, report_error, start_worker
from ._layers import layer_image, result_features, result_layers


class InferenceWidget(Container):
    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self._tasks: list[str] = []  # the checkpoint's tasks (choices are re-read when layers change)
        self.checkpoint = CheckpointPicker()
        self.layer = ComboBox(label="image layer", choices=lambda _w: [(layer.name, layer) for layer in
                                                                       image_layers(self.viewer)], nullable=True)
        self.domain = DomainFields()
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.window = SpinBox(label="window (0 = auto)", value=0, min=0, max=4096, step=4)
        self.box_threshold = FloatSpinBox(label="box score threshold", value=0.5, min=0.0, max=1.0, step=0.05)
        self.explain_boxes = {key: CheckBox(text=text, value=key == "rollout") for key, text in ATTRIBUTION_LABELS.items()}
        self.block = SpinBox(label="block", value=-1, min=-64, max=63)
        self.head = SpinBox(label="head (-1 = mean)", value=-1, min=-1, max=63)
        self.explain_task = ComboBox(label="explain task", choices=lambda _w: self._tasks, nullable=True)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, max=1)
        self.status = Label(value="")
        self.table = Table(value={"task": [], "output": [], "value": []})
        super().__init__(widgets=[self.checkpoint, self.layer, self.domain, self.device, self.window, self.box_threshold,
                                  *self.explain_boxes.values(), self.block, self.head, self.explain_task,
                                  Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                                            labels=False),
                                  self.progress, self.status, self.table])
        self.worker = None
        self.layer.changed.connect(self.domain.fill_from)
        self.checkpoint.folder.changed.connect(self._on_checkpoint)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ choices
    def _refresh_layers(self, _event=None) -> None:
        self.layer.reset_choices()
        if self.layer.value is None and self.layer.choices:
            self.layer.value = self.layer.choices[0]

    def _on_checkpoint(self, _value=None) -> None:
        try:
            model, _ = self.checkpoint.load()
        except Exception as exc:
            self._tasks = []
            self.explain_task.reset_choices()
            self.status.value = report_error(exc, "loading the checkpoint")
            return
        self._tasks = list(model.tasks)
        detection = [name for name, spec in model.tasks.items() if kind_entry(spec.kind).output == "boxes"]
        if detection:  # the checkpoint's calibrated threshold (0.5 when it has none) is the default
            self.box_threshold.value = model.inference.box_threshold(detection[0])
        self.explain_task.reset_choices()
        if self.explain_task.value is None and model.tasks:
            self.explain_task.value = next(iter(model.tasks))
        self.status.value = f"model: {len(model.tasks)} tasks, patch " + (
            f"{model.config.patch_size}" if len(set(model.config.patch_sizes.values())) == 1 else
            f"{model.config.patch_sizes[2]} (2D) / {model.config.patch_sizes[3]} (3D)")

    def select_layer(self, layer) -> None:
        self._refresh_layers()
        self.layer.value = layer

    # ------------------------------------------------------------------ running
    def _set_busy(self, busy: bool) -> None:
        self.run_button.enabled = not busy
        self.cancel_button.enabled = busy

    def _job(self):
        """Everything the worker needs, checked on the GUI thread (bad input never starts a worker)."""
        model, _ = self.checkpoint.load()
        source = self.layer.value
        if source is None:
            raise UserError("no image layer chosen")
        if source not in self.viewer.layers:
            raise UserError(f"layer {source.name!r} is no longer in the viewer")
        domain = self.domain.domain
        image, _ = layer_image(source, domain, self.viewer.dims.current_step)
        methods = [key for key, box in self.explain_boxes.items() if box.value]
        task = self.explain_task.value
        window = self.window.value or None
        from medexplore.train import resolve_device

        device = resolve_device(self.device.value)
        roi = window_for(model, image.shape[1:], window, device=str(device))
        need = estimate_inference_memory(model, image.shape, roi, methods)
        free = psutil.virtual_memory().available
        if need > 0.8 * free:
            raise MemoryError(f"this job needs about {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are free; "
                              f"use a smaller window or fewer explanations")
        options = {"attention": {"block": self.block.value, "head": None if self.head.value < 0 else self.head.value}}
        steps = iter_infer_image(model, image, domain, explain_methods=methods, explain_task=task,
                                 explain_options=options, window=window, box_threshold=self.box_threshold.value,
                                 device=device)
        return source, model, steps, image.ndim - 1

    def run(self, _value=None):
        """Start the job; returns the worker (None when the input was refused)."""
        try:
            source, model, steps, spatial_ndim = self._job()
        except Exception as exc:
            self.status.value = report_error(exc, "inference")
            return None

        @compute_worker
        def work():
            return (yield from steps)

        worker = work()
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda result: self._on_result(source, model, result, spatial_ndim))
        worker.errored.connect(lambda exc: setattr(self.status, "value", report_error(exc, "inference")))
        worker.aborted.connect(lambda: setattr(self.status, "value", "cancelled: nothing was added"))
        worker.finished.connect(lambda: self._set_busy(False))
        self.worker = worker
        self._set_busy(True)
        self.progress.value = 0
        self.status.value = "running..."
        start_worker(worker)
        return worker

    def cancel(self, _value=None) -> None:
        if self.worker is not None:
            self.worker.quit()

    def _on_progress(self, step) -> None:
        done, total = step
        self.progress.max = max(total, 1)
        self.progress.value = done

    def _on_result(self, source, model, result, spatial_ndim: int) -> None:
        from napari.layers import Layer

        if source not in self.viewer.layers:
            self.status.value = report_error(ValueError(f"layer {source.name!r} was removed while running"),
                                             "inference")
            return
        new_layers = [Layer.create(data, kwargs, kind) for data, kwargs, kind in
                      result_layers(source, result, model, spatial_ndim)]  # all built before any is added
        for layer in new_layers:
            self.viewer.add_layer(layer)
        features = result_features(result, model)
        source.metadata["medexplore_results"] = features
        self.table.value = {"task": list(features["task"]), "output": list(features["output"]),
                            "value": [round(v, 4) for v in features["value"]]}
        self.status.value = (f"done: {len(new_layers)} layers, {result.num_windows} window(s) of "
                             f"{'x'.join(map(str, result.window))}")
