"""Training engine, checkpoints, evaluation and metrics."""
from .checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from .engine import Event, NonFiniteLossError, RunControl, RunResult, TrainConfig, Trainer, resolve_device
from .evaluate import collect_predictions, evaluate

__all__ = ["CheckpointError", "Event", "NonFiniteLossError", "RunControl", "RunResult", "TrainConfig", "Trainer",
           "collect_predictions", "evaluate", "load_checkpoint", "load_model", "resolve_device", "save_checkpoint"]
