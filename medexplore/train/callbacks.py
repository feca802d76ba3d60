"""The run's own reactions to its events: checkpoints every N steps, pausing, the metrics log, the
``best`` and ``last`` checkpoints at each epoch's end.

A callback here is ``callback(trainer, event)`` and acts on the kinds it lists in ``kinds``. The
:class:`~medexplore.train.engine.Trainer` calls them after the front-ends' callbacks (which see only
the event), so a front-end can pause or stop a run on the step it is told about.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..models.kinds import headline_metric, monitor_metrics
from .checkpoint import snapshot_name
from .events import Event, EventKind

if TYPE_CHECKING:
    from .engine import Trainer

__all__ = ["RunCallback", "StepCheckpoints", "PauseWhenAsked", "MetricsLog", "BestCheckpoint", "EpochCheckpoint",
           "monitor_value", "DEFAULT_CALLBACKS"]


class RunCallback:
    kinds: frozenset[EventKind] = frozenset()

    def __call__(self, trainer: "Trainer", event: Event) -> None:
        raise NotImplementedError


class StepCheckpoints(RunCallback):
    """``last`` every ``train.checkpoint_every`` steps; a weights-only snapshot every ``train.keep_every``."""

    kinds = frozenset({EventKind.STEP})

    def __call__(self, trainer, event):
        config = trainer.config
        if config.checkpoint_every and trainer.step % config.checkpoint_every == 0:
            trainer.save("last")
        if config.keep_every and trainer.step % config.keep_every == 0:
            trainer.save(snapshot_name(trainer.step), with_state=False)


class PauseWhenAsked(RunCallback):
    """Waits while the run's control is paused, after saving ``last`` (a paused run stays resumable
    even if its process ends while paused)."""

    kinds = frozenset({EventKind.STEP})

    def __call__(self, trainer, event):
        if not trainer.control.paused:
            return
        if trainer.last_saved_step != trainer.step:
            trainer.save("last")
        trainer.emit(trainer.event(EventKind.PAUSED, message="checkpoint saved"))
        trainer.control.wait_while_paused()
        trainer.emit(trainer.event(EventKind.RESUMED))


class MetricsLog(RunCallback):
    """One JSON line per epoch in ``<run>/metrics.jsonl``: step, learning rate, mean losses, validation metrics."""

    kinds = frozenset({EventKind.EPOCH})

    def __call__(self, trainer, event):
        if not trainer.is_main:
            return
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        record = {"epoch": event.epoch, "step": event.step, "lr": trainer.scheduler.get_last_lr()[0],
                  "train": event.losses, "val": event.metrics}
        with open(trainer.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")


def monitor_value(monitor: str, metrics: dict) -> float | None:
    """The number that ranks checkpoints: ``monitor`` averaged over the tasks that report it (``headline``:
    each task's headline metric where higher is better); None when no task reports it."""
    if monitor == "headline":
        found = [headline_metric(m) for m in metrics.values()]
        values = [value for name, value in filter(None, found) if name in monitor_metrics()]
    else:
        values = [m.get(monitor) for m in metrics.values()]
    values = [v for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else None


class BestCheckpoint(RunCallback):
    """Saves ``best`` when the epoch's monitored validation value beats every earlier one."""

    kinds = frozenset({EventKind.EPOCH})

    def __call__(self, trainer, event):
        value = monitor_value(trainer.config.monitor, event.metrics)
        if value is not None and (trainer.best is None or value > trainer.best):
            trainer.best = value
            trainer.save("best")


class EpochCheckpoint(RunCallback):
    """Saves ``last`` at the end of every epoch."""

    kinds = frozenset({EventKind.EPOCH})

    def __call__(self, trainer, event):
        trainer.save("last")


DEFAULT_CALLBACKS = (StepCheckpoints, PauseWhenAsked, MetricsLog, BestCheckpoint, EpochCheckpoint)
