"""Training engine, checkpoints, evaluation and metrics."""
from .checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from .config import TrainConfig
from .device import init_distributed, resolve_device
from .engine import Trainer
from .evaluate import collect_predictions, evaluate
from .events import Event, EventKind, NonFiniteLossError, RunControl, RunResult

__all__ = ["CheckpointError", "Event", "EventKind", "NonFiniteLossError", "RunControl", "RunResult", "TrainConfig",
           "Trainer", "collect_predictions", "evaluate", "init_distributed", "load_checkpoint", "load_model",
           "resolve_device", "save_checkpoint"]
