"""Parts every medexplore widget shares: the checkpoint picker, the layer/domain fields, the device
choice, a model cache, error reporting and starting a worker. magicgui widgets only; no model logic."""
from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
from pathlib import Path

from magicgui.widgets import ComboBox, Container, FileEdit, LineEdit, PushButton
from psygnal import Signal

from medexplore.errors import UserError
from medexplore.models.tasks import Domain
from medexplore.pretrained import pretrained_models
from medexplore.train.checkpoint import CheckpointError, checkpoint_exists, final_checkpoint, load_model
from medexplore.train.openmp import release_thread_team
from medexplore.train.workflow import find_runs

from ._layers import layer_domain

DEVICES = ("auto", "cpu", "cuda", "mps")
RUNS_ENV = "MEDEXPLORE_RUNS"


def runs_root() -> Path:
    """Where widgets look for recent runs and where the training widget writes: ``$MEDEXPLORE_RUNS`` or ./runs."""
    return Path(os.environ.get(RUNS_ENV, "runs")).absolute()


def report_error(exc: BaseException, what: str) -> str:
    """Show ``exc`` as a napari error notification naming what failed; returns the message. A user's
    mistake (``UserError``, a missing or unwritable file) is its one-line message; anything else is a
    bug: its type is named and its traceback goes to stderr."""
    from napari.utils.notifications import show_error

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, (UserError, OSError)):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        text = f"{type(exc).__name__}: {text} (a bug: the traceback is on stderr)"
    message = f"medexplore {what} failed: {text}"
    show_error(message)
    return message


def compute_worker(function):
    """napari's ``thread_worker`` for PyTorch work: the worker thread frees its OpenMP team when it ends.

    Every thread that ran parallel PyTorch work keeps an OpenMP team (``medexplore.train.openmp``); an idle one
    left in napari's thread pool, or on the GUI thread, makes the next worker's PyTorch 20-40% slower on a
    2-core machine. Start the worker with ``start_worker``, which frees the GUI thread's team.
    """
    from napari.qt.threading import thread_worker

    if inspect.isgeneratorfunction(function):
        @functools.wraps(function)
        def steps(*args, **kwargs):
            try:
                return (yield from function(*args, **kwargs))
            finally:
                release_thread_team()
        return thread_worker(steps)

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        finally:
            release_thread_team()
    return thread_worker(call)


def start_worker(worker) -> None:
    """Start a ``compute_worker`` after freeing the GUI thread's idle OpenMP team."""
    release_thread_team()
    worker.start()


class ModelCache:
    """Models loaded from checkpoint folders, reloaded when the checkpoint changes on disk."""

    def __init__(self):
        self._cache: dict[Path, tuple[float, object, dict]] = {}

    def get(self, folder: Path):
        folder = Path(folder)
        meta_file = folder / "meta.json"
        stamp = meta_file.stat().st_mtime if meta_file.exists() else -1.0
        hit = self._cache.get(folder)
        if hit is None or hit[0] != stamp:
            model, meta = load_model(folder)
            self._cache[folder] = hit = (stamp, model, meta)
        return hit[1], hit[2]


MODELS = ModelCache()


class _Runs:
    """``RUNS.changed`` fires when a widget has written a run, so pickers list it."""

    changed = Signal()


RUNS = _Runs()


class CheckpointPicker(Container):
    """A shipped model (listed first), a recent run under the runs folder, or any checkpoint folder picked by hand."""

    def __init__(self, label: str = "checkpoint"):
        self.recent = ComboBox(label="shipped / recent", choices=self._recent_choices, nullable=True)
        self.folder = FileEdit(label=label, mode="d", value="")
        self.refresh_button = PushButton(text="Refresh runs")
        super().__init__(widgets=[self.recent, self.folder, self.refresh_button], labels=True)
        self.refresh_button.changed.connect(self.refresh)
        self.recent.changed.connect(self._on_recent)
        RUNS.changed.connect(self.refresh)

    @staticmethod
    def _recent_choices(_widget=None) -> list[tuple[str, str]]:
        root = runs_root()
        shipped = [(f"shipped: {name}", str(model.folder)) for name, model in pretrained_models().items()]
        return shipped + [(str(run.relative_to(root)) if run != root else run.name, str(run)) for run in find_runs(root)]

    def refresh(self) -> None:
        try:
            self.recent.reset_choices()
        except RuntimeError:  # the widget was closed: stop listening
            RUNS.changed.disconnect(self.refresh)

    def _on_recent(self, value) -> None:
        if value:
            self.folder.value = value if checkpoint_exists(value) else final_checkpoint(value)

    @property
    def path(self) -> Path:
        text = str(self.folder.value or "").strip()
        if text in ("", "."):
            raise CheckpointError("no checkpoint chosen: pick a recent run or a checkpoint folder")
        path = Path(text)
        return final_checkpoint(path) if (path / "checkpoints").is_dir() else path

    def load(self):
        """``(model, meta)`` of the chosen checkpoint (cached)."""
        return MODELS.get(self.path)


class DomainFields(Container):
    """Dimensionality, modality and body part of an image, prefilled from its layer's metadata."""

    def __init__(self):
        self.dimensionality = ComboBox(label="dimensionality", choices=["2d", "3d"], value="2d")
        self.modality = LineEdit(label="modality", value="unknown")
        self.body_part = LineEdit(label="body part", value="unknown")
        super().__init__(widgets=[self.dimensionality, self.modality, self.body_part], labels=True)

    def fill_from(self, layer) -> None:
        if layer is None:
            return
        domain = layer_domain(layer)
        self.dimensionality.value = domain.dimensionality
        self.modality.value = domain.modality
        self.body_part.value = domain.body_part

    @property
    def domain(self) -> Domain:
        return Domain(self.dimensionality.value, self.modality.value.strip() or "unknown",
                      self.body_part.value.strip() or "unknown")


def image_layers(viewer) -> list:
    from napari.layers import Image

    return [layer for layer in viewer.layers if isinstance(layer, Image)]
