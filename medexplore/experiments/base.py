"""What every experiment stands on: its settings, its recipes per budget, its training runs (each
finished run is kept and reused, so an interrupted experiment continues where it stopped) and its
report folder."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..configs import load_recipe
from ..data.registry import build_dataset, check_data_config, dataset_tasks
from ..data.sample import collate
from ..errors import RunStopped, UserError
from ..models.kinds import headline_metric
from ..train import Event, RunControl, resolve_device
from ..train.checkpoint import final_checkpoint, load_model
from ..train.workflow import run_training

__all__ = ["BUDGETS", "RECIPES", "ExperimentSettings", "Experiment", "task_rows",
           "inference_ms", "higher_is_better", "arm_gaps", "spread_outcome", "spread_verdict"]

RECIPES = load_recipe("experiments")  # model and training recipe per budget (medexplore/configs/experiments.yaml)
BUDGETS = tuple(RECIPES)


def inference_ms(exp: "Experiment", outcome: dict, batch_size: int = 32) -> float:
    """Milliseconds per test image of a finished run's model (forward only, after a warm-up batch, the
    fastest of three passes, synchronised on CUDA), measured once and kept in ``runs/KEY/inference.json``."""
    import torch

    cached = exp.run_dir(outcome["key"]) / "inference.json"
    if cached.exists():
        return json.loads(cached.read_text())["ms_per_image"]
    device = resolve_device(exp.settings.device)
    model, meta = load_model(outcome["checkpoint"], device)
    samples = exp.samples("test", meta["data"])
    batches = [collate(samples[i:i + batch_size]).to(device) for i in range(0, len(samples), batch_size)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.eval()
    passes = []
    with torch.no_grad():
        model(batches[0])
        for _ in range(3):  # the fastest of three passes: the least disturbed by other work on the machine
            sync()
            start = time.perf_counter()
            for batch in batches:
                model(batch)
            sync()
            passes.append(time.perf_counter() - start)
    ms = 1000 * min(passes) / len(samples)
    cached.write_text(json.dumps({"ms_per_image": ms, "images": len(samples), "device": str(device)}))
    return ms


def task_rows(outcome: dict, **columns) -> list[dict]:
    """One row per task of a run's test metrics: ``task``, ``metric`` (its headline), ``value``, plus ``columns``."""
    rows = []
    for task, metrics in outcome["test"].items():
        found = headline_metric(metrics)
        if found is not None:
            rows.append({**columns, "task": task, "metric": found[0], "value": found[1]})
    return rows


def higher_is_better(metric: str) -> bool:
    return metric != "mae"


def arm_gaps(rows, by: Sequence[str], arm: str, reference: str, floor: float = 0.0):
    """Per group of ``by`` (which names ``metric``): ``gain`` of ``arm`` over ``reference`` (difference of
    seed means, sign flipped for MAE so positive is better), ``tolerance`` (the larger seed sd of the two
    arms, at least ``floor``; 0 with one seed) and ``outcome``: +1 ahead by more than the tolerance, -1
    behind by more, 0 within it."""
    import pandas as pd

    by = list(by)
    if "metric" not in by:
        raise UserError(f"arm_gaps: group by the metric too (by={by})")
    stats = rows[rows.arm.isin([arm, reference])].groupby([*by, "arm"])["value"].agg(["mean", "std"])
    out = []
    for key, group in stats.groupby(level=by):
        group = group.droplevel(by)
        if arm not in group.index or reference not in group.index:
            continue
        key = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        sign = 1 if higher_is_better(key["metric"]) else -1
        gain = sign * (group.loc[arm, "mean"] - group.loc[reference, "mean"])
        tolerance = max(floor, float(group["std"].fillna(0.0).max()))
        out.append({**key, "gain": gain, "tolerance": tolerance, "outcome": spread_outcome(gain, tolerance)})
    return pd.DataFrame(out, columns=[*by, "gain", "tolerance", "outcome"])


def spread_outcome(gain: float, tolerance: float) -> int:
    """+1 when ``gain`` exceeds ``tolerance`` (a seed spread), -1 when it is below ``-tolerance``, else 0."""
    return 0 if abs(gain) <= tolerance else (1 if gain > 0 else -1)


def spread_verdict(outcomes) -> bool | str:
    """A claim "arm beats reference" over cells: held when ahead beyond the spread in most cells, did not
    hold when behind beyond it in at least as many as ahead and in half or more, else not shown."""
    outcomes = list(outcomes)
    ahead, behind = sum(o > 0 for o in outcomes), sum(o < 0 for o in outcomes)
    if ahead > len(outcomes) / 2:
        return True
    if behind >= ahead and behind >= len(outcomes) / 2:
        return False
    return "not shown"


@dataclass(frozen=True)
class ExperimentSettings:
    """What a user chooses: the data section (datasets, root, size...), the budget, the seeds, the device,
    and ``overrides`` of the budget's recipe (``{"model": {...}, "train": {...}, "pretrain": {...}, "adapt": {...}}``)."""

    data: dict = field(default_factory=lambda: {"datasets": ["embedded"]})
    budget: str = "small"
    seeds: tuple[int, ...] = (0, 1)
    device: str = "auto"
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.budget not in BUDGETS:
            raise UserError(f"--budget must be one of {BUDGETS}, got {self.budget!r}")
        if not self.seeds:
            raise UserError("--seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"--seeds repeats a seed: {list(self.seeds)}")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "data", check_data_config(self.data))
        unknown = sorted(set(self.overrides) - set(RECIPES[self.budget]))
        if unknown:
            raise UserError(f"recipe overrides for unknown section(s) {unknown}; sections: {sorted(RECIPES[self.budget])}")

    @property
    def recipe(self) -> dict:
        recipe = copy.deepcopy(RECIPES[self.budget])
        for section, values in self.overrides.items():
            recipe[section].update(values)
        return recipe

    @property
    def datasets(self) -> list[str]:
        return list(self.data["datasets"])


class Experiment:
    """One experiment's folder: ``experiment.json`` (its settings), ``runs/KEY/`` (one training run
    each, with ``outcome.json`` once finished), figures and ``report.md``.

    A folder holding another experiment, or the same one with other data or budget, is refused; the
    seeds may change between calls (finished runs of any seed are reused).
    """

    def __init__(self, name: str, out: str | Path, settings: ExperimentSettings,
                 callbacks: Sequence[Callable[[Event], None]] = (), control: RunControl | None = None):
        self.name, self.out, self.settings = name, Path(out), settings
        self.callbacks, self.control = list(callbacks), control
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"--out {self.out} is a file, not a directory")
        stored = self.out / "experiment.json"
        mine = {"experiment": name, "data": settings.data, "budget": settings.budget, "overrides": settings.overrides}
        if stored.exists():
            before = json.loads(stored.read_text())
            changed = [k for k in mine if json.dumps(before.get(k), sort_keys=True) != json.dumps(mine[k], sort_keys=True)]
            if changed:
                raise FileExistsError(f"{self.out} holds experiment {before.get('experiment')!r} with other "
                                      + ", ".join(f"{k} ({before.get(k)!r}, now {mine[k]!r})" for k in changed)
                                      + "; choose another --out")
        elif self.out.exists() and any(self.out.iterdir()):
            raise FileExistsError(f"--out {self.out} is not empty and holds no experiment; choose another directory")
        self.out.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps({**mine, "seeds": list(settings.seeds), "device": settings.device}, indent=1))
        (self.out / "figures").mkdir(exist_ok=True)

    def config(self, seed: int, data: dict | None = None, model: dict | None = None, train: dict | None = None) -> dict:
        """A run config: the budget's recipe with ``seed`` (model initialisation and batch order) and overrides."""
        recipe = self.settings.recipe
        return {"model": {**recipe["model"], **(model or {})},
                "data": {**self.settings.data, **(data or {})},
                "train": {**recipe["train"], **(train or {}), "seed": seed, "device": self.settings.device}}

    def pretrain_config(self, seed: int, data: dict | None = None, train: dict | None = None) -> dict:
        recipe = self.settings.recipe
        return {"model": recipe["model"], "data": {**self.settings.data, **(data or {})},
                "train": {**recipe["pretrain"], **(train or {}), "seed": seed, "device": self.settings.device}}

    def tasks(self, data: dict | None = None) -> list:
        return dataset_tasks(build_dataset({**self.settings.data, **(data or {})}, "val"))

    def run_dir(self, key: str) -> Path:
        return self.out / "runs" / key

    def train(self, key: str, config: dict, mode: str = "supervised", init: str | Path | None = None) -> dict:
        """Run ``config`` into ``runs/KEY`` unless it finished before; the outcome: test metrics,
        ``seconds`` (wall time of every call that worked on it), ``steps``, ``parameters``, ``checkpoint``."""
        folder = self.run_dir(key)
        done = folder / "outcome.json"
        wanted = json.loads(json.dumps({"config": config, "mode": mode, "init": str(init) if init else None}, default=str))
        if done.exists():
            record = json.loads(done.read_text())
            made = {k: record.get(k) for k in wanted}
            if made != wanted:
                raise FileExistsError(f"{folder} was trained with another configuration than this version of "
                                      f"{self.name} asks for; choose another --out")
            return record
        for callback in self.callbacks:
            callback(Event("run", message=f"{self.name}: {key}"))
        outcome = self._timed(folder, lambda: run_training(config, folder, mode=mode, init=init, resume=True,
                                                           callbacks=self.callbacks, control=self.control))
        if outcome.result.stopped:
            raise RunStopped(f"{self.name}: run {key} was stopped (its last checkpoint is kept); "
                                    "run the same command again to continue")

        model, _ = load_model(final_checkpoint(folder))
        record = {**wanted, "key": key, "test": outcome.test_metrics, "seconds": self._spent(folder),
                  "steps": outcome.result.step, "parameters": sum(p.numel() for p in model.parameters()),
                  "checkpoint": str(final_checkpoint(folder))}
        done.write_text(json.dumps(record, indent=1, default=float))
        return record

    @staticmethod
    def _spent(folder: Path) -> float:
        spent = folder / "seconds.json"
        return json.loads(spent.read_text())["seconds"] if spent.exists() else 0.0

    def _timed(self, folder: Path, work: Callable):
        """Run ``work`` adding its wall time to ``folder/seconds.json``, also when it is stopped or fails, so
        a resumed run's time counts every part."""
        before, start = self._spent(folder), time.perf_counter()
        try:
            return work()
        finally:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "seconds.json").write_text(json.dumps({"seconds": before + time.perf_counter() - start}))

    def samples(self, split: str, data: dict | None = None, n: int = 64) -> list:
        """Up to ``n`` samples of ``split`` spread evenly over it (the same ones on every call)."""
        dataset = build_dataset({**self.settings.data, **(data or {})}, split)
        step = max(1, len(dataset) // n)
        return [dataset[i] for i in range(0, len(dataset), step)][:n]
