"""Every hyper-parameter of a training run: :class:`TrainConfig`, checked when it is built."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import UserError
from ..models.kinds import monitor_metrics
from ..models.packing import PACKING_MODES
from ..typed import coerce_fields
from .balancing import LOSS_BALANCES

__all__ = ["TrainConfig", "MODES", "BALANCE"]

MODES = ("supervised", "vicreg")
BALANCE = ("none", "source", "label", "source_label")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings (every hyper-parameter of the loop lives here).

    Args:
        mode: ``supervised`` (multitask losses) or ``vicreg`` (self-supervised, no labels used).
        epochs, steps_per_epoch: run length; ``steps_per_epoch`` defaults to one pass over the data.
        batch_size: samples per optimizer step (global, across DDP ranks and accumulation).
        accum_steps: micro-batches per optimizer step.
        lr, weight_decay, warmup_fraction, min_lr_fraction: AdamW with linear warm-up and cosine decay.
        clip_grad: max global gradient norm (None: off).
        device: ``auto`` (CUDA, then MPS, then CPU), or any torch device string.
        compile: ``torch.compile`` the model.
        balance: sample so that every ``source`` (dataset) or every ``label`` class is equally likely, or
            (``source_label``) every source and, within it, every label class. Only binary and multiclass
            labels are re-weighted (:func:`~medexplore.train.builders.balanced_tasks`).
        balance_power: how far ``label`` and ``source_label`` even out the classes: each class is drawn in
            proportion to ``count ** (1 - balance_power)`` (1: every class equally, 0.5: square-root shares).
        prior_correction: when ``balance`` changes how often each class is seen, the loss adjusts the class
            logits so that the model's probabilities stay those of the data (:mod:`medexplore.train.priors`).
        checkpoint_every: save ``last`` every N steps (0: at the end of each epoch only).
        tensorboard: also log losses and metrics for TensorBoard into ``<run>/tensorboard``.
        keep_every: also keep a weights-only snapshot ``checkpoints/step_NNNNNNN`` every N steps
            (0: none), e.g. to follow the Fisher spectrum over training.
        monitor: validation metric (averaged over tasks) that selects the ``best`` checkpoint;
            ``headline`` averages each task's headline metric (AUC, Dice or mAP@0.5), so a multitask
            run is not judged by its classification tasks alone.
        expander: VICReg expander sizes.
        augment: label-consistent augmentation of supervised batches (:class:`~medexplore.data.transforms.Augment`).
        loss_balance: how task losses combine: ``fixed`` (TaskSpec weights), ``uncertainty`` or ``gradnorm``
            (:mod:`medexplore.train.balancing`).
        packing: how batches are packed for attention: ``grouped`` (compact segments) or ``padded``
            (one padded segment, the reference).
        ema_decay: keep an exponential moving average of the weights (e.g. 0.999; 0: off). Validation,
            ``best`` and snapshots then hold the averaged weights; ``last`` keeps the trained ones (and the
            average, for an exact resume).
        label_smoothing: move class targets (binary, multiclass, multilabel, ordinal) towards uniform by
            this much (0: off; e.g. 0.1); masks, boxes and regression values are not smoothed.
        learn: parameter-name prefixes (whole dotted parts) that learn (empty: every parameter), e.g.
            ``[heads.tissue.]`` to retrain one task's decoder on a frozen model
            (:func:`~medexplore.train.weights.learn_only`).

    With ``accum_steps > 1`` each task's loss is averaged per micro-batch, which equals the full-batch
    average when every micro-batch carries the same number of that task's labels.
    """

    mode: str = "supervised"
    epochs: int = 10
    steps_per_epoch: int | None = None
    batch_size: int = 128
    accum_steps: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.01
    clip_grad: float | None = 1.0
    device: str = "auto"
    compile: bool = False
    seed: int = 0
    balance: str = "none"
    balance_power: float = 1.0
    prior_correction: bool = True
    checkpoint_every: int = 0
    keep_every: int = 0
    tensorboard: bool = False
    monitor: str = "auc"
    eval_batch_size: int = 256
    num_workers: int = 0
    expander: tuple[int, ...] = (512, 512, 512)
    augment: bool = True
    loss_balance: str = "fixed"
    packing: str = "grouped"
    ema_decay: float = 0.0
    label_smoothing: float = 0.0
    learn: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "expander", tuple(self.expander))
        object.__setattr__(self, "learn", tuple(self.learn))
        if any(not isinstance(p, str) or not p for p in self.learn):
            raise UserError(f"train.learn must be a list of parameter-name prefixes, got {list(self.learn)}")
        if self.mode not in MODES:
            raise UserError(f"TrainConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.loss_balance not in LOSS_BALANCES:
            raise UserError(f"train.loss_balance must be one of {LOSS_BALANCES}, got {self.loss_balance!r}")
        if self.packing not in PACKING_MODES:
            raise UserError(f"train.packing must be one of {PACKING_MODES}, got {self.packing!r}")
        if self.balance not in BALANCE:
            raise UserError(f"TrainConfig.balance must be one of {BALANCE}, got {self.balance!r}")
        if not 0 <= self.balance_power <= 1:
            raise UserError(f"train.balance_power must be in [0, 1], got {self.balance_power}")
        for name in ("epochs", "batch_size", "accum_steps", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_every"):
            if getattr(self, name) < 0:
                raise UserError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.accum_steps:
            raise UserError(f"TrainConfig.batch_size {self.batch_size} must be divisible by accum_steps {self.accum_steps}")
        if self.monitor not in monitor_metrics():
            raise UserError(f"train.monitor must be one of {monitor_metrics()} (a validation metric where "
                             f"higher is better), got {self.monitor!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"train.lr must be a finite number > 0, got {self.lr}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise UserError(f"train.steps_per_epoch must be >= 1 (or null: one pass over the data), got {self.steps_per_epoch}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise UserError(f"train.clip_grad must be > 0 (or null: no clipping), got {self.clip_grad}")
        if not self.weight_decay >= 0:
            raise UserError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.num_workers < 0:
            raise UserError(f"train.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.min_lr_fraction <= 1:
            raise UserError(f"train.min_lr_fraction must be in [0, 1], got {self.min_lr_fraction}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"train.ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"train.label_smoothing must be in [0, 0.5) (0: off), got {self.label_smoothing}")
        if not 0 <= self.warmup_fraction < 1:
            raise UserError(f"TrainConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

    @classmethod
    def from_dict(cls, d: dict, section: str = "train") -> "TrainConfig":
        """Build from a config section, converting every value to its field's type (``"3e-4"`` -> 3e-4)."""
        return cls(**coerce_fields(cls, d, section))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["expander"] = list(self.expander)
        d["learn"] = list(self.learn)
        return d
