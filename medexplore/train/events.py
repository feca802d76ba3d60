"""What a run tells its front-ends (:class:`Event` of an :class:`EventKind`) and how they steer it
(:class:`RunControl`: pause, resume, stop between steps)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

__all__ = ["EventKind", "Event", "RunControl", "RunResult", "NonFiniteLossError"]


class EventKind(str, Enum):
    """The kinds of :class:`Event`; each equals its lower-case name as a string (``EventKind.STEP == "step"``)."""

    RUN = "run"  # an experiment or bench starts one of its runs (message: which)
    ADAPTED = "adapted"  # the model was adapted before training (message: the report)
    START = "start"
    STEP = "step"  # one optimizer step (losses, samples_per_s, eta_s)
    EVAL = "eval"  # validation metrics
    EPOCH = "epoch"  # mean losses of the epoch and its validation metrics
    CHECKPOINT = "checkpoint"  # message: the checkpoint's name
    PAUSED = "paused"
    RESUMED = "resumed"
    STOPPED = "stopped"
    DONE = "done"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the task(s)."""


@dataclass
class Event:
    """Progress of a run (``kind`` is an :class:`EventKind`; a plain string is converted)."""

    kind: EventKind
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    samples_per_s: float = 0.0
    eta_s: float = float("nan")
    message: str = ""

    def __post_init__(self):
        self.kind = EventKind(self.kind)


class RunControl:
    """Thread-safe pause/stop requests, honoured between steps."""

    def __init__(self):
        self._stop, self._running = threading.Event(), threading.Event()
        self._running.set()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_while_paused(self, poll_s: float = 0.1) -> None:
        while not self._running.wait(poll_s):
            pass


@dataclass
class RunResult:
    run_dir: Path
    step: int
    stopped: bool
    metrics: dict
    best: float | None
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT), ``last`` saved
