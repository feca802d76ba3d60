"""One training loop for VICReg pretraining, supervised multitask training and fine-tuning.

The loop emits :class:`Event` objects to callbacks (the CLI prints them, napari and notebooks
will plot them) and honours pause/stop requests from a :class:`RunControl` between steps.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ..data.sample import collate
from ..data.sampling import WeightedBatchSampler, balanced_weights, labels_of
from ..data.transforms import Augment
from ..models.kinds import headline_metric, kind_entry, monitor_metrics
from ..models.medformer import Medformer
from ..models.packing import PACKING_MODES, Batch
from ..ssl import Expander, TwoViews, VICRegLoss
from ..typed import coerce_fields
from .balancing import BALANCER_LR_SCALE, LOSS_BALANCES, make_balancer
from .checkpoint import load_checkpoint, load_into, rng_state, save_checkpoint, set_rng_state, snapshot_name
from .evaluate import evaluate

__all__ = ["TrainConfig", "Trainer", "Event", "RunControl", "NonFiniteLossError", "resolve_device",
           "RunResult",
           "init_distributed"]

MODES = ("supervised", "vicreg")
BALANCE = ("none", "source", "label")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the task(s)."""


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
        balance: sample so that every ``source`` (dataset) or every ``label`` class is equally likely.
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

    def __post_init__(self):
        object.__setattr__(self, "expander", tuple(self.expander))
        if self.mode not in MODES:
            raise ValueError(f"TrainConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.loss_balance not in LOSS_BALANCES:
            raise ValueError(f"train.loss_balance must be one of {LOSS_BALANCES}, got {self.loss_balance!r}")
        if self.packing not in PACKING_MODES:
            raise ValueError(f"train.packing must be one of {PACKING_MODES}, got {self.packing!r}")
        if self.balance not in BALANCE:
            raise ValueError(f"TrainConfig.balance must be one of {BALANCE}, got {self.balance!r}")
        for name in ("epochs", "batch_size", "accum_steps", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"TrainConfig.batch_size {self.batch_size} must be divisible by accum_steps {self.accum_steps}")
        if self.monitor not in monitor_metrics():
            raise ValueError(f"train.monitor must be one of {monitor_metrics()} (a validation metric where "
                             f"higher is better), got {self.monitor!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"train.steps_per_epoch must be >= 1 (or null: one pass over the data), got {self.steps_per_epoch}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"train.clip_grad must be > 0 (or null: no clipping), got {self.clip_grad}")
        if not self.weight_decay >= 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.min_lr_fraction <= 1:
            raise ValueError(f"train.min_lr_fraction must be in [0, 1], got {self.min_lr_fraction}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"TrainConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

    @classmethod
    def from_dict(cls, d: dict, section: str = "train") -> "TrainConfig":
        """Build from a config section, converting every value to its field's type (``"3e-4"`` -> 3e-4)."""
        return cls(**coerce_fields(cls, d, section))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["expander"] = list(self.expander)
        return d


@dataclass
class Event:
    """Progress of a run: ``kind`` is adapted, start, step, epoch, eval, checkpoint, paused, resumed, stopped or done."""

    kind: str
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    samples_per_s: float = 0.0
    eta_s: float = float("nan")
    message: str = ""


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


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use auto or cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} requested but MPS is not available; use auto or cpu")
    return device


def init_distributed() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on CUDA, else gloo).

    Returns True when running distributed. Safe to call when not launched by torchrun.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def _cosine_schedule(total: int, warmup: int, min_fraction: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _source_keys(dataset: Dataset, balance: str) -> list:
    if balance == "source":
        source_of = getattr(dataset, "source_of", None)
        if source_of is None:
            raise ValueError("balance='source' needs a MixedDataset (several sources)")
        return [source_of(i) for i in range(len(dataset))]
    keys = []
    for i in range(len(dataset)):
        labels = labels_of(dataset, i)
        keys.append(tuple(sorted((k, int(v)) for k, v in labels.items() if torch.as_tensor(v).numel() == 1)))
    return keys


class Trainer:
    """Trains ``model`` on ``train_data`` (Samples), writing ``run_dir`` and emitting events.

    Example:
        >>> trainer = Trainer(model, train_set, TrainConfig(epochs=2), "runs/demo", val_data=val_set)
        >>> result = trainer.fit()  # doctest: +SKIP
    """

    def __init__(self, model: Medformer, train_data: Dataset, config: TrainConfig, run_dir: str | Path,
                 val_data: Dataset | None = None, callbacks: Sequence[Callable[[Event], None]] = (),
                 control: RunControl | None = None, data_config: dict | None = None):
        if len(train_data) == 0:
            raise ValueError("Trainer: the training dataset is empty")
        if config.mode == "supervised" and not model.tasks:
            raise ValueError("Trainer: supervised training needs a model with at least one task")
        self.model, self.train_data, self.val_data, self.config = model, train_data, val_data, config
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks)
        self.control = control or RunControl()
        self.data_config = dict(data_config or {})
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is None and dist.is_available() and dist.is_initialized():
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        if config.tensorboard and self.is_main:
            from .tensorboard import TensorBoardLogger

            self.callbacks.append(TensorBoardLogger(self.run_dir / "tensorboard"))
        torch.manual_seed(config.seed)
        self.expander = Expander(model.config.embed_dim, config.expander) if config.mode == "vicreg" else None
        self.vicreg = VICRegLoss() if config.mode == "vicreg" else None
        self.views = TwoViews()
        self.augment = Augment() if config.augment and config.mode == "supervised" else None
        self.model.to(self.device)
        if self.expander is not None:
            self.expander.to(self.device)
        self.balancer = (make_balancer(config.loss_balance, {n: t.weight for n, t in model.tasks.items()})
                         if config.mode == "supervised" else None)
        if self.balancer is not None and dist.is_available() and dist.is_initialized():
            raise ValueError(f"train.loss_balance {config.loss_balance!r} is single-process only (its weights "
                             "would differ between processes); use fixed under DDP")
        params = list(model.parameters()) + (list(self.expander.parameters()) if self.expander else [])
        decay = [p for p in params if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.balancer is not None:
            self.balancer.to(self.device)
            groups.append({"params": list(self.balancer.parameters()), "weight_decay": 0.0,
                           "lr": config.lr * BALANCER_LR_SCALE})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr)
        micro = config.batch_size // config.accum_steps
        if micro % self.world:
            raise ValueError(f"micro-batch {micro} is not divisible by {self.world} processes")
        weights = None if config.balance == "none" else balanced_weights(_source_keys(train_data, config.balance))
        full_steps = max(1, len(train_data) // config.batch_size)
        self.steps_per_epoch = config.steps_per_epoch or full_steps
        self.sampler = WeightedBatchSampler(len(train_data), micro, weights,
                                            num_batches=self.steps_per_epoch * config.accum_steps, seed=config.seed,
                                            rank=self.rank, world_size=self.world)
        self.total_steps = self.steps_per_epoch * config.epochs
        warmup = int(config.warmup_fraction * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _cosine_schedule(self.total_steps, warmup, config.min_lr_fraction))
        self.forward_model = model
        if self.distributed:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=True, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.expander is not None:
                self.expander = torch.nn.parallel.DistributedDataParallel(self.expander)
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.step, self.epoch, self.best = 0, 0, None
        self.epoch_losses: dict[str, float] = {}  # sums over the steps of the current epoch so far
        self.interrupted = False
        self.last_saved_step: int | None = None  # step of the newest ``last`` checkpoint
        self.last_metrics: dict = {}

    # ------------------------------------------------------------------ events and files
    def emit(self, event: Event) -> None:
        for callback in self.callbacks:
            callback(event)

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _meta(self) -> dict:
        meta = {"run": self.config.to_dict(), "data": self.data_config, "step": self.step, "epoch": self.epoch,
                "best": self.best, "monitor": self.config.monitor, "metrics": self.last_metrics,
                "epoch_loss_sums": self.epoch_losses}
        if self.balancer is not None:
            meta["loss_weights"] = self.balancer.weights()
        return meta

    def save(self, name: str, with_state: bool = True) -> None:
        if not self.is_main:
            return
        state = ({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng_state()}
                 if with_state else None)
        if state is not None and self.balancer is not None:
            state["balancer"] = self.balancer.state_dict()
        extra = self.expander_module.state_dict() if self.expander is not None else None
        save_checkpoint(self.run_dir / "checkpoints" / name, self.model, self._meta(), state, extra)
        if name == "last":
            self.last_saved_step = self.step
        self.emit(Event("checkpoint", self.step, self.total_steps, self.epoch, message=name))

    @property
    def expander_module(self):
        return getattr(self.expander, "module", self.expander)

    def restore(self, folder: Path) -> None:
        """Continue exactly from a checkpoint written by :meth:`save`."""
        meta, weights, state = load_checkpoint(folder, map_location=self.device)
        if state is None:
            raise ValueError(f"{folder}: has no training state to resume from")
        extra = load_into(self.model, weights, str(folder))
        if self.expander is not None:
            self.expander_module.load_state_dict(extra)
        if meta["run"] != self.config.to_dict():
            changed = sorted(k for k in meta["run"] if meta["run"].get(k) != self.config.to_dict().get(k))
            if set(changed) - {"epochs", "device", "num_workers", "checkpoint_every", "keep_every", "tensorboard"}:
                raise ValueError(f"{folder}: cannot resume with changed run settings {changed}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.balancer is not None:
            self.balancer.load_state_dict(state["balancer"])
        set_rng_state(state["rng"])
        self.step, self.epoch, self.best = meta["step"], meta["epoch"], meta.get("best")
        self.epoch_losses = dict(meta.get("epoch_loss_sums", {}))
        self.last_saved_step = self.step
        self._truncate_log(self.epoch)

    def _truncate_log(self, epoch: int) -> None:
        """Drop metrics lines of epochs after ``epoch`` (logged after the checkpoint a resume starts from)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.is_main or not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epoch]
        if len(kept) != len(lines):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)

    # ------------------------------------------------------------------ one step
    def _augmented(self, batch: Batch, step: int) -> Batch:
        """``batch`` with every image augmented (labels moved along), reproducible from (seed, step, rank)."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step * 7919 + self.rank + 17)
        outputs = {name: kind_entry(t.kind).output for name, t in self.model.tasks.items()}
        spatial = {name: output for name, output in outputs.items() if output != "vector"}
        targets = {name: list(labels) for name, labels in batch.targets.items()}
        groups = []
        for images, ids in zip(batch.groups, batch.group_samples):
            rows = []
            for image, s in zip(images, ids.tolist()):
                labels = {name: targets[name][s] for name in targets}
                image, labels = self.augment(image, labels, spatial, g)
                rows.append(image)
                for name, value in labels.items():
                    targets[name][s] = value
            groups.append(torch.stack(rows))
        return Batch(groups, batch.group_samples, batch.domains, targets, batch.meta)

    def _loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.config.mode == "supervised":
            if self.augment is not None:
                batch = self._augmented(batch, step)
            batch = batch.to(self.device, non_blocking=True)
            out = self.forward_model(batch, packing=self.config.packing)
            total, per_task = self.model.compute_loss(out, batch)
            if self.balancer is not None and per_task:
                shared = [p for p in self.model.blocks[-1].parameters() if p.requires_grad]
                total = self.balancer.combine(per_task, shared)
            return total, per_task
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step * 7919 + self.rank)
        images = [img for group, ids in zip(batch.groups, batch.group_samples) for img in group.cpu()]
        order = [int(i) for ids in batch.group_samples for i in ids]
        domains = [batch.domains[i] for i in order]
        views = [self.views(img, g) for img in images]
        v1 = Batch.from_images([a for a, _ in views], domains).to(self.device)
        v2 = Batch.from_images([b for _, b in views], domains).to(self.device)
        z1 = self.expander(self.forward_model(v1, packing=self.config.packing).embedding)
        z2 = self.expander(self.forward_model(v2, packing=self.config.packing).embedding)
        terms = self.vicreg.terms(z1.float(), z2.float())
        return self.vicreg.combine(terms), terms

    def _train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        self.model.train()
        if self.expander is not None:
            self.expander.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in micro_batches:
            with self.autocast():
                loss, per_task = self._loss(micro, self.step)
            if not torch.isfinite(loss):
                bad = [k for k, v in per_task.items() if not torch.isfinite(v)] or ["(total)"]
                last = self.run_dir / "checkpoints" / "last"
                kept = (f"the last good checkpoint (step {self.last_saved_step}) is kept in {last}; "
                        f"lower train.lr or check the labels, then --resume" if self.last_saved_step is not None
                        else "no checkpoint had been saved yet; a new run may use the same --out")
                raise NonFiniteLossError(f"non-finite loss at step {self.step + 1} in task(s) {bad}; {kept}")
            (loss / len(micro_batches)).backward()
            totals["loss"] = totals.get("loss", 0.0) + loss.item() / len(micro_batches)
            for k, v in per_task.items():
                totals[k] = totals.get(k, 0.0) + v.item() / len(micro_batches)
        if self.config.clip_grad:
            params = [p for group in self.optimizer.param_groups[:2] for p in group["params"]]  # not the balancer's
            torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad)
        self.optimizer.step()
        if self.balancer is not None:
            self.balancer.after_step()
        self.scheduler.step()
        self.step += 1
        return totals

    def _validate(self) -> dict:
        if self.val_data is None or not self.model.tasks or self.config.mode != "supervised":
            return {}
        metrics = evaluate(self.model, self.val_data, self.config.eval_batch_size, self.device,
                           self.config.num_workers, self.autocast)
        self.emit(Event("eval", self.step, self.total_steps, self.epoch, metrics=metrics))
        return metrics

    def _monitor_value(self, metrics: dict) -> float | None:
        if self.config.monitor == "headline":  # each task's headline where higher is better (not regression's MAE)
            found = [headline_metric(m) for m in metrics.values()]
            values = [value for name, value in filter(None, found) if name in monitor_metrics()]
        else:
            values = [m.get(self.config.monitor) for m in metrics.values()]
        values = [v for v in values if v is not None and v == v]
        return sum(values) / len(values) if values else None

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> RunResult:
        """Train to the end (or until stopped); with ``resume``, continue from ``checkpoints/last``.

        In the main thread, Ctrl-C (SIGINT) asks the run to stop after the current step and save
        ``last`` (``RunResult.interrupted``); a second Ctrl-C interrupts at once.
        """
        with self._sigint_requests_stop():
            return self._fit(resume)

    @contextlib.contextmanager
    def _sigint_requests_stop(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def request_stop(signum, frame):
            self.interrupted = True
            self.control.stop()
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C is not delayed

        signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _fit(self, resume: bool) -> RunResult:
        last = self.run_dir / "checkpoints" / "last"
        if resume:
            self.restore(last)
        elif self.is_main:
            if (self.run_dir / "metrics.jsonl").exists() or last.exists():
                raise FileExistsError(f"{self.run_dir} already holds a run; use resume or another directory")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(
                {"run": self.config.to_dict(), "data": self.data_config, "model": self.model.spec_dict()}, indent=2))
        loader = DataLoader(self.train_data, batch_sampler=self.sampler, collate_fn=collate,
                            num_workers=self.config.num_workers,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator())
        accum = self.config.accum_steps
        self.emit(Event("start", self.step, self.total_steps, self.epoch, message=f"device {self.device}"))
        start_time, start_step, stopped = time.perf_counter(), self.step, False
        while self.epoch < self.config.epochs and not stopped:
            in_epoch = self.step - self.epoch * self.steps_per_epoch
            self.sampler.set_epoch(self.epoch, skip_batches=in_epoch * accum)
            pending: list[Batch] = []
            for batch in loader:
                pending.append(batch)
                if len(pending) < accum:
                    continue
                t0 = time.perf_counter()
                losses = self._train_step(pending)
                pending = []
                for k, v in losses.items():
                    self.epoch_losses[k] = self.epoch_losses.get(k, 0.0) + v
                elapsed = time.perf_counter() - start_time
                rate = (self.step - start_step) / elapsed
                self.emit(Event("step", self.step, self.total_steps, self.epoch, losses,
                                samples_per_s=self.config.batch_size / max(time.perf_counter() - t0, 1e-9),
                                eta_s=(self.total_steps - self.step) / rate if rate > 0 else float("nan")))
                if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                    self.save("last")
                if self.config.keep_every and self.step % self.config.keep_every == 0:
                    self.save(snapshot_name(self.step), with_state=False)
                if self.control.paused:  # a paused run is resumable even if the process ends while paused
                    if self.last_saved_step != self.step:
                        self.save("last")
                    self.emit(Event("paused", self.step, self.total_steps, self.epoch, message="checkpoint saved"))
                    self.control.wait_while_paused()
                    self.emit(Event("resumed", self.step, self.total_steps, self.epoch))
                if self.control.stop_requested:
                    stopped = True
                    break
            if stopped:
                break
            self.epoch += 1
            metrics = self._validate()
            self.last_metrics = metrics
            mean_losses = {k: v / self.steps_per_epoch for k, v in self.epoch_losses.items()}  # the whole epoch
            self.epoch_losses = {}
            self._log({"epoch": self.epoch, "step": self.step, "lr": self.scheduler.get_last_lr()[0],
                       "train": mean_losses, "val": metrics})
            self.emit(Event("epoch", self.step, self.total_steps, self.epoch, mean_losses, metrics))
            value = self._monitor_value(metrics)
            if value is not None and (self.best is None or value > self.best):
                self.best = value
                self.save("best")
            self.save("last")
        if stopped:
            self.save("last")
            self.emit(Event("stopped", self.step, self.total_steps, self.epoch, message="stopped on request"))
        else:
            self.emit(Event("done", self.step, self.total_steps, self.epoch, metrics=self.last_metrics))
        return RunResult(self.run_dir, self.step, stopped, self.last_metrics, self.best, self.interrupted)
