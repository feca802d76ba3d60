"""One training loop for VICReg pretraining, supervised multitask training and fine-tuning.

The :class:`Trainer` is assembled from parts: an objective (:mod:`.objectives`), optimizer, schedule,
sampler and DDP wrapper (:mod:`.builders`), and callbacks on its events (:mod:`.callbacks`: checkpoints,
pausing, the metrics log, the best checkpoint). Front-ends pass callbacks of their own that receive
every :class:`~medexplore.train.events.Event`, and steer the run with a
:class:`~medexplore.train.events.RunControl`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.sample import collate
from ..errors import UserError
from ..models.medformer import Medformer
from ..models.packing import Batch
from .builders import build_optimizer, build_sampler, build_scheduler, sampling_weights, wrap_ddp
from .callbacks import DEFAULT_CALLBACKS, RunCallback
from .checkpoint import load_checkpoint, load_into, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .device import autocast_for, is_distributed, resolve_device
from .ema import WeightAverage
from .evaluate import evaluate
from .events import Event, EventKind, NonFiniteLossError, RunControl, RunResult
from .objectives import make_objective
from .priors import prior_offsets

__all__ = ["Trainer"]

RESUMABLE_CHANGES = {"epochs", "device", "num_workers", "checkpoint_every", "keep_every", "tensorboard"}


class Trainer:
    """Trains ``model`` on ``train_data`` (Samples), writing ``run_dir`` and emitting events.

    ``run_dir/config.json`` records the run's settings, ``data_config`` and ``init`` (the checkpoint the
    weights were initialised from, if any).

    Example:
        >>> trainer = Trainer(model, train_set, TrainConfig(epochs=2), "runs/demo", val_data=val_set)
        >>> result = trainer.fit()  # doctest: +SKIP
    """

    def __init__(self, model: Medformer, train_data: Dataset, config: TrainConfig, run_dir: str | Path,
                 val_data: Dataset | None = None, callbacks: Sequence[Callable[[Event], None]] = (),
                 control: RunControl | None = None, data_config: dict | None = None,
                 run_callbacks: Sequence[RunCallback] | None = None, init: str | None = None):
        if len(train_data) == 0:
            raise UserError("Trainer: the training dataset is empty")
        if config.mode == "supervised" and not model.tasks:
            raise UserError("Trainer: supervised training needs a model with at least one task")
        self.model, self.train_data, self.val_data, self.config = model, train_data, val_data, config
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks)
        self.run_callbacks = list(run_callbacks) if run_callbacks is not None else [c() for c in DEFAULT_CALLBACKS]
        self.control = control or RunControl()
        self.data_config = dict(data_config or {})
        self.init = init
        self.distributed = is_distributed()
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is None and self.distributed:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.world = torch.distributed.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        if config.tensorboard and self.is_main:
            from .tensorboard import TensorBoardLogger

            self.callbacks.append(TensorBoardLogger(self.run_dir / "tensorboard"))
        weights = sampling_weights(train_data, config.balance, model.tasks, config.balance_power)
        offsets = prior_offsets(model.tasks, train_data, weights) if config.prior_correction and config.mode == "supervised" else {}
        torch.manual_seed(config.seed)  # the objective's own modules (VICReg's expander) start from the seed
        self.objective = make_objective(model, config, self.rank, self.distributed, offsets)
        self.model.to(self.device)
        self.objective.to(self.device)
        self.optimizer = build_optimizer([model, *self.objective.modules()], config, self.objective.param_groups())
        self.steps_per_epoch = config.steps_per_epoch or max(1, len(train_data) // config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.sampler = build_sampler(train_data, config, self.steps_per_epoch, weights, self.rank, self.world)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.average = WeightAverage(model, config.ema_decay) if config.ema_decay else None
        self.forward_model = model
        if self.distributed:
            self.forward_model = wrap_ddp(model, self.device, find_unused=True)
            self.objective.distribute(lambda module: wrap_ddp(module, self.device))
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.step, self.epoch, self.best = 0, 0, None
        self.epoch_losses: dict[str, float] = {}  # sums over the steps of the current epoch so far
        self.stopped = self.interrupted = False
        self.last_saved_step: int | None = None  # step of the newest ``last`` checkpoint
        self.last_metrics: dict = {}

    # ------------------------------------------------------------------ events and files
    def event(self, kind: EventKind, **fields) -> Event:
        """An event of ``kind`` stamped with the run's position."""
        return Event(kind, self.step, self.total_steps, self.epoch, **fields)

    def emit(self, event: Event) -> None:
        """Front-ends' callbacks first, then the run's own (which may pause on it or save)."""
        for callback in self.callbacks:
            callback(event)
        for callback in self.run_callbacks:
            if event.kind in callback.kinds:
                callback(self, event)

    def autocast(self):
        return autocast_for(self.device)

    def _meta(self) -> dict:
        return {"run": self.config.to_dict(), "data": self.data_config, "step": self.step, "epoch": self.epoch,
                "best": self.best, "monitor": self.config.monitor, "metrics": self.last_metrics,
                "epoch_loss_sums": self.epoch_losses, **self.objective.meta()}

    def evaluated_weights(self):
        """A context in which the model holds the weights a run evaluates and publishes (the average with
        ``train.ema_decay``, else its own)."""
        return self.average.applied() if self.average is not None else contextlib.nullcontext(self.model)

    def save(self, name: str, with_state: bool = True) -> None:
        """Checkpoint ``name``: ``last`` holds the trained weights (and everything to resume), any other
        checkpoint the evaluated ones."""
        if not self.is_main:
            return
        state = None
        if with_state:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": rng_state(), **self.objective.state_dict()}
            if self.average is not None:
                state["weight_average"] = self.average.state_dict()
        weights = contextlib.nullcontext() if name == "last" else self.evaluated_weights()
        with weights:
            save_checkpoint(self.run_dir / "checkpoints" / name, self.model, self._meta(), state,
                            self.objective.extra_weights())
        if name == "last":
            self.last_saved_step = self.step
        self.emit(self.event(EventKind.CHECKPOINT, message=name))

    def restore(self, folder: Path) -> None:
        """Continue exactly from a checkpoint written by :meth:`save`."""
        meta, weights, state = load_checkpoint(folder, map_location=self.device)
        if state is None:
            raise UserError(f"{folder}: has no training state to resume from")
        self.objective.load_extra_weights(load_into(self.model, weights, str(folder)))
        ours = self.config.to_dict()
        changed = sorted(k for k in meta["run"] if meta["run"].get(k) != ours.get(k))
        if set(changed) - RESUMABLE_CHANGES:
            raise UserError(f"{folder}: cannot resume with changed run settings {changed}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state)
        if self.average is not None:
            self.average.load_state_dict(state["weight_average"])
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
    def _train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` (gradient accumulation); the mean losses."""
        self.model.train()
        self.objective.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in micro_batches:
            with self.autocast():
                loss, terms = self.objective.loss(self.forward_model, micro, self.step, self.device)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(self._non_finite_message(terms))
            (loss / len(micro_batches)).backward()
            for k, v in {"loss": loss, **terms}.items():
                totals[k] = totals.get(k, 0.0) + v.item() / len(micro_batches)
        if self.config.clip_grad:
            params = [p for group in self.optimizer.param_groups[:2] for p in group["params"]]  # not a balancer's
            torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad)
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        self.objective.after_step()
        self.scheduler.step()
        self.step += 1
        return totals

    def _non_finite_message(self, terms: dict) -> str:
        bad = [k for k, v in terms.items() if not torch.isfinite(v)] or ["(total)"]
        last = self.run_dir / "checkpoints" / "last"
        kept = (f"the last good checkpoint (step {self.last_saved_step}) is kept in {last}; "
                f"lower train.lr or check the labels, then --resume" if self.last_saved_step is not None
                else "no checkpoint had been saved yet; a new run may use the same --out")
        return f"non-finite loss at step {self.step + 1} in task(s) {bad}; {kept}"

    def _validate(self) -> dict:
        if self.val_data is None or not self.model.tasks or self.config.mode != "supervised":
            return {}
        with self.evaluated_weights() as model:
            metrics = evaluate(model, self.val_data, self.config.eval_batch_size, self.device,
                               self.config.num_workers, self.autocast)
        self.emit(self.event(EventKind.EVAL, metrics=metrics))
        return metrics

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> RunResult:
        """Train to the end (or until stopped); with ``resume``, continue from ``checkpoints/last``.

        In the main thread, Ctrl-C (SIGINT) asks the run to stop after the current step and save
        ``last`` (``RunResult.interrupted``); a second Ctrl-C interrupts at once.
        """
        with self._sigint_requests_stop():
            return self._fit(resume)

    @property
    def done(self) -> bool:
        return self.stopped or self.epoch >= self.config.epochs

    def _fit(self, resume: bool) -> RunResult:
        self._open_run_dir(resume)
        loader = DataLoader(self.train_data, batch_sampler=self.sampler, collate_fn=collate,
                            num_workers=self.config.num_workers,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator())
        self.emit(self.event(EventKind.START, message=f"device {self.device}"))
        clock = (time.perf_counter(), self.step)
        while not self.done:
            for micro_batches in self._optimizer_steps(loader):
                started = time.perf_counter()
                losses = self._train_step(micro_batches)
                self._report_step(losses, time.perf_counter() - started, clock)
                if self.control.stop_requested:
                    self.stopped = True
                    break
            else:
                self._end_epoch()
        if self.stopped:
            self.save("last")
            self.emit(self.event(EventKind.STOPPED, message="stopped on request"))
        else:
            self.emit(self.event(EventKind.DONE, metrics=self.last_metrics))
        return RunResult(self.run_dir, self.step, self.stopped, self.last_metrics, self.best, self.interrupted)

    def _open_run_dir(self, resume: bool) -> None:
        last = self.run_dir / "checkpoints" / "last"
        if resume:
            self.restore(last)
        elif self.is_main:
            if (self.run_dir / "metrics.jsonl").exists() or last.exists():
                raise FileExistsError(f"{self.run_dir} already holds a run; use resume or another directory")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(
                {"run": self.config.to_dict(), "data": self.data_config, "model": self.model.spec_dict(),
                 "init": self.init}, indent=2))

    def _optimizer_steps(self, loader: DataLoader) -> Iterator[list[Batch]]:
        """The rest of the current epoch, as lists of ``accum_steps`` micro-batches (after a resume, the
        sampler skips the batches the epoch already used)."""
        accum = self.config.accum_steps
        self.sampler.set_epoch(self.epoch, skip_batches=(self.step - self.epoch * self.steps_per_epoch) * accum)
        pending: list[Batch] = []
        for batch in loader:
            pending.append(batch)
            if len(pending) == accum:
                yield pending
                pending = []

    def _report_step(self, losses: dict[str, float], seconds: float, clock: tuple[float, int]) -> None:
        for k, v in losses.items():
            self.epoch_losses[k] = self.epoch_losses.get(k, 0.0) + v
        rate = (self.step - clock[1]) / (time.perf_counter() - clock[0])
        self.emit(self.event(EventKind.STEP, losses=losses, samples_per_s=self.config.batch_size / max(seconds, 1e-9),
                             eta_s=(self.total_steps - self.step) / rate if rate > 0 else float("nan")))

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.last_metrics = self._validate()
        mean_losses = {k: v / self.steps_per_epoch for k, v in self.epoch_losses.items()}
        self.epoch_losses = {}
        self.emit(self.event(EventKind.EPOCH, losses=mean_losses, metrics=self.last_metrics))

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
