"""Run events as text: a tqdm bar for steps and one line per epoch (the CLI's and notebooks' display)."""
from __future__ import annotations

import json
import sys
import time
from typing import Callable

from tqdm.auto import tqdm

from .events import Event, EventKind

__all__ = ["ProgressPrinter"]

SHOWN_METRICS = ("auc", "acc", "dice", "mae", "map@0.5")
ESTIMATE_AFTER = 5  # timed steps before the run's length is estimated


class ProgressPrinter:
    """Prints engine events to stderr: a tqdm bar for steps (none when ``quiet``), one line per epoch,
    after the first few steps one line estimating the training time (validation not included), and
    after the first epoch one line with its training and validation time and the whole run's estimate."""

    def __init__(self, quiet: bool = False, clock: Callable[[], float] = time.perf_counter):
        self.quiet, self.bar, self.first_step, self.clock = quiet, None, None, clock
        self.started = self.last_step_at = None
        self.epoch_timed = False

    def __call__(self, event: Event) -> None:
        if event.kind in (EventKind.ADAPTED, EventKind.RUN):
            print(event.message, file=sys.stderr)
        elif event.kind == EventKind.START:
            self.first_step, self.started = event.step, self.clock()
            if not self.quiet:
                self.bar = tqdm(total=event.total_steps, initial=event.step, unit="step", dynamic_ncols=True,
                                file=sys.stderr)
        elif event.kind == EventKind.STEP:
            self.last_step_at = self.clock()
            if self.first_step is not None and event.step - self.first_step == ESTIMATE_AFTER and event.eta_s == event.eta_s:
                self._print(f"estimated training time: {event.eta_s / 60:.1f} min for {event.total_steps - event.step} "
                            f"more steps (from the first {ESTIMATE_AFTER})")
            if self.bar is not None:
                self.bar.update(event.step - self.bar.n)
                self.bar.set_postfix(loss=f"{event.losses.get('loss', float('nan')):.4f}", sps=f"{event.samples_per_s:.0f}")
        elif event.kind == EventKind.EPOCH:
            val = {t: {k: round(v, 4) for k, v in m.items() if k in SHOWN_METRICS} for t, m in event.metrics.items()}
            line = f"epoch {event.epoch} step {event.step}/{event.total_steps} loss {event.losses.get('loss', float('nan')):.4f}"
            self._print(line + (f" val {json.dumps(val)}" if val else ""))
            if not self.epoch_timed and self.last_step_at is not None and event.step < event.total_steps:
                self.epoch_timed = True
                self._print(self._epoch_estimate(event))
        elif event.kind in (EventKind.DONE, EventKind.STOPPED) and self.bar is not None:
            self.bar.close()
            self.bar = None

    def _epoch_estimate(self, event: Event) -> str:
        """The first epoch's training and validation time, and the whole run's at that rate."""
        steps = event.step - self.first_step
        train_s, val_s = self.last_step_at - self.started, self.clock() - self.last_step_at
        epochs_left = (event.total_steps - event.step) / max(steps, 1)
        left = epochs_left * (train_s + val_s)
        return (f"epoch time: {train_s:.0f} s training + {val_s:.0f} s validation; about {left / 60:.1f} min for the "
                f"remaining {epochs_left:.0f} epoch(s)")

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)
