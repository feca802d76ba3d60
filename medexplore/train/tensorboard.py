"""TensorBoard logging as an engine callback (``train.tensorboard: true``): losses per step, metrics per epoch."""
from __future__ import annotations

from pathlib import Path

from .events import Event

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    """Writes ``Event``s to ``log_dir`` (view with ``tensorboard --logdir RUN/tensorboard``).

    Scalars: ``train/<loss>`` every step, ``val/<task>/<metric>`` every epoch (numbers only).
    """

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("train.tensorboard needs the tensorboard package: pip install tensorboard") from exc
        self.log_dir, self._writer_class, self.writer = Path(log_dir), SummaryWriter, None

    def __call__(self, event: Event) -> None:
        if self.writer is None:  # created with the run, not before the run folder is checked
            self.writer = self._writer_class(str(self.log_dir))
        if event.kind == "step":
            for name, value in event.losses.items():
                self.writer.add_scalar(f"train/{name}", value, event.step)
        elif event.kind == "epoch":
            for task, metrics in event.metrics.items():
                for name, value in metrics.items():
                    if isinstance(value, (int, float)) and value == value:
                        self.writer.add_scalar(f"val/{task}/{name}", value, event.step)
            for name, value in event.losses.items():
                self.writer.add_scalar(f"epoch/{name}", value, event.epoch)
        elif event.kind in ("done", "stopped"):
            self.writer.flush()
