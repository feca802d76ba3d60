"""Train from a panel: ``medexplore.train.workflow.run_training`` in a thread worker, driven by ``RunControl``.

Events from the engine are queued by the worker thread and drained by a QTimer on the GUI thread, so
Qt is only touched there; torch releases the GIL inside its kernels, which keeps the viewer responsive
(``benchmarks/bench_napari.py`` measures the event-loop latency while training).
"""
from __future__ import annotations

import queue
import time
from pathlib import Path

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, LineEdit, ProgressBar, PushButton, SpinBox
from qtpy.QtCore import QTimer

from medexplore.adapt.strategies import STRATEGIES
from medexplore.configs import load_recipe
from medexplore.data.registry import available_datasets
from medexplore.errors import UserError
from medexplore.train import RunControl
from medexplore.train.checkpoint import final_checkpoint
from medexplore.train.workflow import check_adapt_config, checkpoint_architecture, run_training

from ._common import DEVICES, RUNS, compute_worker, report_error, runs_root, start_worker
from ._plots import CurvesCanvas

NO_STRATEGY = "none (every weight learns)"
MODEL_SIZES = load_recipe("model_sizes")  # label: the config's model section (medexplore/configs/model_sizes.yaml)
AS_CHECKPOINT = "as the start checkpoint"  # the architecture of the checkpoint it starts from (e.g. a shipped model)


class TrainingWidget(Container):
    def __init__(self, napari_viewer=None):
        self.viewer = napari_viewer
        self.dataset = ComboBox(label="dataset", choices=available_datasets(), value="embedded")
        self.data_path = FileEdit(label="MedMNIST folder / CSV", mode="r", value="")
        self.tasks = LineEdit(label="tasks (comma list; blank = all)", value="")
        self.size = ComboBox(label="model", choices=[*MODEL_SIZES, AS_CHECKPOINT], value="micro (CPU minutes)")
        self.epochs = SpinBox(label="epochs", value=3, min=1, max=10000)
        self.steps = SpinBox(label="steps per epoch (0 = all)", value=0, min=0, max=10**6)
        self.batch_size = SpinBox(label="batch size", value=32, min=1, max=4096)
        self.lr = FloatSpinBox(label="learning rate", value=1e-3, min=1e-6, max=1.0, step=1e-4)
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.init = FileEdit(label="start from checkpoint (optional)", mode="d", value="")
        self.strategy = ComboBox(label="adaptation", choices=(NO_STRATEGY, *STRATEGIES), value=NO_STRATEGY,
                                 tooltip="what learns when starting from a checkpoint (medexplore.adapt)")
        self.general = FileEdit(label="general expert (gmoe)", mode="d", value="", visible=False)
        self.strategy.changed.connect(lambda value: setattr(self.general, "visible", value == "gmoe"))
        self.run_name = LineEdit(label="run name", value=time.strftime("run-%Y%m%d-%H%M%S"))
        self.start_button = PushButton(text="Start")
        self.pause_button = PushButton(text="Pause", enabled=False)
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, max=1)
        self.status = Label(value="")
        self.curves = CurvesCanvas()
        super().__init__(widgets=[self.dataset, self.data_path, self.tasks, self.size, self.epochs, self.steps,
                                  self.batch_size, self.lr, self.device, self.init, self.strategy, self.general,
                                  self.run_name,
                                  Container(widgets=[self.start_button, self.pause_button, self.stop_button],
                                            layout="horizontal", labels=False),
                                  self.progress, self.status])
        self.native.layout().addWidget(self.curves.native)
        self.control: RunControl | None = None
        self.worker = None
        self.events: queue.Queue = queue.Queue()
        self.history: list = []
        self.last_run: Path | None = None
        self.timer = QTimer()
        self.timer.setInterval(100)
        self.timer.timeout.connect(self._drain_events)
        self.start_button.changed.connect(self.start)
        self.pause_button.changed.connect(self.toggle_pause)
        self.stop_button.changed.connect(self.stop)

    # ------------------------------------------------------------------ configuration
    def config(self) -> dict:
        """The run's configuration, as the CLI would take it."""
        name = self.dataset.value
        data: dict = {"datasets": [name]}
        path = str(self.data_path.value or "").strip()
        if name == "folder":
            if path in ("", "."):
                raise UserError("the folder dataset needs a CSV file (MedMNIST folder / CSV)")
            data["csv"] = path
        elif name != "embedded" and path not in ("", "."):
            data["root"] = path
        tasks = [t.strip() for t in self.tasks.value.split(",") if t.strip()]
        if tasks:
            data["tasks"] = tasks
        train = {"epochs": self.epochs.value, "batch_size": self.batch_size.value, "lr": self.lr.value,
                 "device": self.device.value}
        if self.steps.value:
            train["steps_per_epoch"] = self.steps.value
        adapt = {}
        if self.strategy.value != NO_STRATEGY:
            adapt["strategy"] = self.strategy.value
            general = str(self.general.value or "").strip()
            if self.strategy.value == "gmoe" and general not in ("", "."):
                adapt["general"] = general
        return {"model": self._model_section(), "data": data, "train": train, "adapt": adapt}

    def _start_checkpoint(self) -> str | None:
        init = str(self.init.value or "").strip()
        return init if init not in ("", ".") else None

    def _model_section(self) -> dict:
        if self.size.value != AS_CHECKPOINT:
            return dict(MODEL_SIZES[self.size.value])
        init = self._start_checkpoint()
        if init is None:
            raise UserError(f"model {AS_CHECKPOINT!r} needs a start checkpoint")
        return checkpoint_architecture(init)

    def out_dir(self) -> Path:
        name = self.run_name.value.strip()
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"run name {name!r}: use a plain folder name")
        return runs_root() / name

    # ------------------------------------------------------------------ run control
    def _set_state(self, running: bool) -> None:
        self.start_button.enabled = not running
        self.pause_button.enabled = running
        self.stop_button.enabled = running
        self.pause_button.text = "Pause"

    def start(self, _value=None):
        """Start training; returns the worker (None when the configuration was refused)."""
        try:
            config, out = self.config(), self.out_dir()
            init = self._start_checkpoint()
            check_adapt_config(config["adapt"], init)
        except Exception as exc:
            self.status.value = report_error(exc, "training")
            return None
        control = RunControl()
        events = self.events

        @compute_worker
        def work():
            return run_training(config, out, init=init, callbacks=[events.put], control=control)

        worker = work()
        worker.returned.connect(self._on_done)
        worker.errored.connect(lambda exc: setattr(self.status, "value", report_error(exc, "training")))
        worker.finished.connect(self._on_finished)
        self.control, self.worker, self.history = control, worker, []
        self.last_run = out
        self.curves.clear()
        self.progress.value = 0
        self.status.value = f"starting {out.name}..."
        self._set_state(True)
        self.timer.start()
        start_worker(worker)
        return worker

    def toggle_pause(self, _value=None) -> None:
        if self.control is None:
            return
        if self.control.paused:
            self.control.resume()
            self.pause_button.text = "Pause"
        else:
            self.control.pause()
            self.pause_button.text = "Resume"

    def stop(self, _value=None) -> None:
        if self.control is not None:
            self.control.stop()
            self.status.value = "stopping after this step (a checkpoint is saved)..."

    # ------------------------------------------------------------------ events (GUI thread)
    def _drain_events(self) -> None:
        changed = False
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            self.history.append(event)
            changed = True
            if event.total_steps:
                self.progress.max = event.total_steps
                self.progress.value = min(event.step, event.total_steps)
            if event.kind == "step":
                self.status.value = (f"step {event.step}/{event.total_steps}  loss "
                                     f"{event.losses.get('loss', float('nan')):.4f}  {event.samples_per_s:.0f} samples/s")
            elif event.kind == "adapted":
                self.status.value = event.message
            elif event.kind in ("paused", "resumed", "stopped", "checkpoint", "eval"):
                self.status.value = f"{event.kind} at step {event.step}" + (f": {event.message}" if event.message else "")
        if changed:
            self.curves.update(self.history)

    def _on_done(self, outcome) -> None:
        self._drain_events()
        checkpoint = final_checkpoint(self.last_run)
        stopped = getattr(getattr(outcome, "result", None), "stopped", False)
        self.status.value = f"{'stopped' if stopped else 'finished'}: checkpoint {checkpoint}"
        from napari.utils.notifications import show_info

        show_info(f"medexplore training {'stopped' if stopped else 'finished'}: {checkpoint}")

    def _on_finished(self) -> None:
        self._drain_events()
        self.curves.update(self.history, force=True)
        self.timer.stop()
        self._set_state(False)
        self.control = None
        RUNS.changed.emit()  # the new run appears in every checkpoint picker's recent runs
