"""Whole runs from one config dict: build data and model, train, test, draw figures.

The CLI, the napari widgets and the notebooks all call these functions.
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ..adapt.strategies import AdaptConfig
from ..configs import load_recipe
from ..data.registry import build_dataset, check_data_config, dataset_parts, dataset_tasks, vocab_for
from ..data.sample import collate
from ..errors import UserError
from ..models import create_model
from ..models.config import MedformerConfig
from ..models.inference_defaults import InferenceDefaults
from ..models.kinds import kind_entry
from ..models.medformer import Medformer
from ..typed import coerce_fields
from .calibration import calibrate_inference
from .checkpoint import (
    checkpoint_exists,
    final_checkpoint,
    init_from_checkpoint,
    load_model,
    recover_checkpoints,
    resolve_checkpoint,
    save_inference_defaults,
)
from .config import TrainConfig
from .device import is_distributed, resolve_device
from .engine import Trainer
from .evaluate import evaluate
from .events import Event, EventKind, RunControl, RunResult
from .runlock import LOCK_NAME, RunLock
from .weights import adapt_model, learn_only

__all__ = ["DEFAULT_CONFIG", "check_adapt_config", "find_runs", "build_model", "run_training", "RunOutcome",
           "calibrate_checkpoint"]

DEFAULT_CONFIG = load_recipe("defaults")  # every run config starts from it (medexplore/configs/defaults.yaml)


@dataclass
class RunOutcome:
    run_dir: Path
    result: RunResult
    test_metrics: dict


def build_model(model_cfg: dict, tasks, vocab=None) -> Medformer:
    """The model a config's ``model`` section describes (values converted to their fields' types)."""
    options = coerce_fields(MedformerConfig, dict(model_cfg), "model", extra={"name": str})
    name = options.pop("name", "medformer_tiny")
    if vocab is not None and "vocab" not in options:
        options["vocab"] = vocab
    return create_model(name, tasks=tasks, **options)


def model_section(config: MedformerConfig) -> dict:
    """The ``model`` config section that :func:`build_model` turns back into ``config``'s architecture (the
    vocabulary is left out: a run takes it from its data)."""
    return {"name": "medformer_tiny", **{k: v for k, v in config.to_dict().items() if k != "vocab"}}


def checkpoint_architecture(checkpoint: str | Path) -> dict:
    """The ``model`` section of a checkpoint folder's (or shipped model's) architecture, to train it further."""
    model, _ = load_model(checkpoint)
    return model_section(model.config)


def find_runs(root: str | Path, max_depth: int = 2) -> list[Path]:
    """Run directories under ``root`` (itself included, ``max_depth`` levels down) holding a usable
    checkpoint, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    candidates = [root] + [p for depth in range(1, max_depth + 1) for p in root.glob("/".join(["*"] * depth))]
    runs = {p: final_checkpoint(p) for p in candidates if p.is_dir()}
    runs = {p: c for p, c in runs.items() if checkpoint_exists(c)}
    saved = {p: (c / "meta.json").stat().st_mtime if (c / "meta.json").exists() else 0.0 for p, c in runs.items()}
    return sorted(runs, key=saved.get, reverse=True)


def _absolute_paths(data: dict) -> dict:
    """Data paths made absolute, so ``evaluate`` and ``--resume`` find them from any directory."""
    return {k: (str(Path(v).expanduser().resolve()) if k in ("path", "root", "csv", "pseudo_labels") and v
                else list(v) if isinstance(v, tuple) else v) for k, v in data.items()}


def _check_monitor(monitor: str, tasks) -> None:
    produced = {m for t in tasks for m in kind_entry(t.kind).metrics} | ({"headline"} if tasks else set())
    if tasks and monitor not in produced:
        raise UserError(f"train.monitor {monitor!r} is not a validation metric of any task here "
                         f"({', '.join(f'{t.name}: {t.kind.value}' for t in tasks)}); choose one of {sorted(produced)}")


def _check_images(model: Medformer, *datasets) -> None:
    """The model takes one image of every dataset part (patch size, channels), before anything is written."""
    for dataset in datasets:
        for part in dataset_parts(dataset) if dataset is not None else ():
            if hasattr(part, "check"):
                part.check()  # e.g. folder datasets: every header and mask shape
            if len(part):
                model.layout(collate([part[0]]))


def check_adapt_config(section: dict | None, init: str | Path | None = None):
    """The ``adapt`` section as an AdaptConfig (None when no strategy is asked for), checked against ``init``."""
    if not section or not section.get("strategy"):
        if section:
            raise UserError(f"adapt section {sorted(section)} without adapt.strategy; name one (e.g. lora)")
        return None
    cfg = AdaptConfig.from_dict(section)
    cfg.check_sources()
    if not (init or cfg.weights):
        raise UserError(f"adapt.strategy {cfg.strategy} adapts a pretrained model: give --init CHECKPOINT "
                         "or adapt.weights (--weights)")
    return cfg


def _prepare_run_dir(out: Path, resume: bool, data: dict) -> bool:
    """Whether to resume; refuses a folder holding another run, takes over one that never saved a checkpoint."""
    stored = out / "config.json"
    recover_checkpoints(out / "checkpoints")
    has_checkpoint = checkpoint_exists(out / "checkpoints" / "last")
    if resume and has_checkpoint and stored.exists():
        before = json.loads(stored.read_text()).get("data", {})
        changed = sorted(k for k in set(before) | set(data) if before.get(k) != data.get(k))
        if changed:
            raise UserError(f"{out}: --resume with other data than the run used: "
                             + "; ".join(f"data.{k} was {before.get(k)!r}, now {data.get(k)!r}" for k in changed))
    if has_checkpoint:
        if not resume:
            raise FileExistsError(f"output directory {out} holds a run; continue it with --resume, "
                                  "or choose another directory")
        return True
    leftovers = [p for p in out.iterdir()
                 if p.name not in (LOCK_NAME, "config.json", "metrics.jsonl", "checkpoints", "tensorboard")]
    if leftovers:
        raise FileExistsError(f"output directory {out} is not empty ({leftovers[0].name}, ...); choose another directory")
    for name in ("config.json", "metrics.jsonl"):  # a run that stopped before its first checkpoint
        (out / name).unlink(missing_ok=True)
    for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(out / name, ignore_errors=True)
    return False


def _splits(data: dict, mode: str, test: bool) -> dict[str, Dataset]:
    """The splits a run reads: train always; val and (unless ``test`` is off) test for supervised runs."""
    wanted = ["train"] + (["val"] + (["test"] if test else []) if mode == "supervised" else [])
    return {split: build_dataset(data, split) for split in wanted}


def _run_model(config: dict, train_cfg: TrainConfig, train_set: Dataset, model: Medformer | None) -> Medformer:
    """The model a run trains: ``model`` as given, or built from the ``model`` section with one head per
    task the training data carries (initial weights from ``train.seed``); ``train.monitor`` is checked
    against its tasks first."""
    supervised = train_cfg.mode == "supervised"
    tasks = (list(model.tasks.values()) if model is not None else dataset_tasks(train_set)) if supervised else []
    if supervised:
        _check_monitor(train_cfg.monitor, tasks)
    if model is None:
        torch.manual_seed(train_cfg.seed)
        model = build_model(config["model"], tasks, vocab_for(train_set))
    return model


def calibrate_checkpoint(folder: str | Path, val_set: Dataset, batch_size: int = 32, device="cpu") -> InferenceDefaults:
    """Calibrate a checkpoint's inference defaults on ``val_set`` and store them in it
    (:func:`medexplore.train.calibration.calibrate_inference`); returns them."""
    model, _ = load_model(Path(folder), device)
    defaults = calibrate_inference(model, val_set, batch_size, device)
    save_inference_defaults(folder, defaults)
    return defaults


def run_training(config: dict, out: str | Path, mode: str = "supervised", init: str | Path | None = None,
                 resume: bool = False, callbacks: Sequence[Callable[[Event], None]] = (),
                 control: RunControl | None = None, test: bool = True,
                 datasets: Mapping[str, Dataset] | None = None, model: Medformer | None = None) -> RunOutcome:
    """Train (or pretrain) as ``config`` says, then score the best checkpoint on the test split.

    Everything that can fail on bad input (config types, data, images against the model, the init
    checkpoint) is checked before the run directory is touched. The directory is locked for the run's
    life; a folder left by a run that never saved a checkpoint is taken over, and ``resume`` of such
    a folder starts from the beginning.

    Callers that built their own data or model pass them: ``datasets`` maps ``train`` (and ``val``,
    ``test``) to datasets (e.g. a patient-level split), replacing what the config's ``data`` section
    would build (the section is then only recorded with the run); ``model`` replaces building one from
    the ``model`` section (e.g. an expert already adapted and measured).
    """
    is_main = not is_distributed() or torch.distributed.get_rank() == 0
    config = copy.deepcopy(config)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    data = dict(config.get("data") or {})
    config["data"] = data if datasets is not None else _absolute_paths(check_data_config(data))
    if config.get("train", {}).get("mode", mode) != mode:
        raise UserError(f"train.mode is set by the command ({mode}); remove train.mode={config['train']['mode']!r}")
    train_cfg = TrainConfig.from_dict({**config.get("train", {}), "mode": mode})
    adapt_cfg = check_adapt_config(config.get("adapt"), init)
    if adapt_cfg is not None and train_cfg.learn:
        raise UserError(f"train.learn {list(train_cfg.learn)} and adapt.strategy {adapt_cfg.strategy} both choose "
                         "what learns; use one")
    resolve_device(train_cfg.device)  # an unknown or absent device fails before the folder is touched
    splits = dict(datasets) if datasets is not None else _splits(config["data"], mode, test)
    if "train" not in splits:
        raise UserError(f"run_training: datasets must include a train split, got {sorted(splits)}")
    train_set = splits["train"]
    val_set = splits.get("val") if mode == "supervised" else None
    test_set = splits.get("test") if mode == "supervised" and test else None
    model = _run_model(config, train_cfg, train_set, model)
    _check_images(model, train_set, val_set, test_set)
    if init:
        init_from_checkpoint(model, init)
    if adapt_cfg is not None:
        report = adapt_model(model, adapt_cfg)
        for callback in callbacks:
            callback(Event(EventKind.ADAPTED, message=str(report)))
    if train_cfg.learn:
        learning = learn_only(model, train_cfg.learn)
        for callback in callbacks:
            callback(Event(EventKind.ADAPTED, message=f"train.learn {list(train_cfg.learn)}: {learning:,} of "
                                                      f"{model.num_params(False):,} parameters learn"))
    with RunLock(out) if is_main else contextlib.nullcontext():
        resume = _prepare_run_dir(out, resume, config["data"]) if is_main else resume
        if is_distributed():
            flag = torch.tensor([int(resume)])
            torch.distributed.broadcast(flag, 0)
            resume = bool(flag.item())
        trainer = Trainer(model, train_set, train_cfg, out, val_data=val_set, callbacks=callbacks, control=control,
                          data_config=config["data"], init=init and str(resolve_checkpoint(init).resolve()))
        result = trainer.fit(resume=resume)
        test_metrics = {}
        if is_main and val_set is not None and not result.stopped:
            calibrate_checkpoint(final_checkpoint(out), val_set, train_cfg.eval_batch_size, trainer.device)
        if is_main and test_set is not None and not result.stopped:
            best_model, _ = load_model(final_checkpoint(out), trainer.device)
            test_metrics = evaluate(best_model, test_set, train_cfg.eval_batch_size, trainer.device)
            (out / "test_metrics.json").write_text(json.dumps(test_metrics, indent=2, default=float))
    return RunOutcome(out, result, test_metrics)
