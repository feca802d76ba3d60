"""``medexplore adapt-bench``: every strategy on every dataset, from one medical (and one general) expert.

Each cell (dataset x strategy [x prompt count] [x patient-OOD]) adapts the medical expert, trains it
with one recipe, and scores its best checkpoint on the test split. Finished cells are appended to
``results.csv`` at once, so an interrupted bench continues where it stopped (a cell caught halfway
resumes from its own ``last`` checkpoint). ``results.md`` and ``adapt_bench.png`` are redrawn from the
CSV at the end.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from ..adapt.strategies import STRATEGIES, AdaptConfig
from ..analysis.mixing import gate_weights, summarize_mixing
from ..configs import load_recipe
from ..data.registry import build_dataset, dataset_domains, dataset_tasks
from ..data.sample import collate
from ..errors import RunStopped, UserError
from ..models.kinds import kind_entry
from ..train import Event, RunControl, TrainConfig
from ..train.checkpoint import checkpoint_exists, final_checkpoint, load_model
from ..train.evaluate import evaluate
from ..train.runlock import RunLock
from ..train.weights import adapt_model
from ..train.workflow import run_training
from ..viz.adapt import plot_adapt_bench
from .memory import step_memory
from .protocol import PROMPT_COUNTS, patient_ids, patient_split

__all__ = ["BenchSpec", "bench_cells", "run_adapt_bench", "write_report"]

RESULTS = "results.csv"
COLUMNS = ("key", "dataset", "strategy", "prompts", "protocol", "auc", "acc", "dice", "trainable", "backbone_trainable",
           "total", "trainable_pct", "step_memory_mb", "activation_mb", "seconds", "resumed", "ood_auc", "ood_drop",
           "held_out", "gates", "metrics")


@dataclass(frozen=True)
class BenchSpec:
    """What ``adapt-bench`` runs.

    Args:
        medical: the medical expert (a medexplore checkpoint, e.g. VICReg on medical images); every
            strategy starts from it.
        general: the general expert for ``gmoe`` (checkpoint, timm file or name); ``gmoe`` is skipped without.
        datasets: dataset names (``embedded``, MedMNIST flags); ``data`` holds the rest of the data section.
        strategies: strategies to compare; ``vpt_*`` use ``prompts`` tokens.
        prompt_counts, sweep: the prompt-count sweep (``vpt_deep``) on the datasets in ``sweep``.
        ood: also run every strategy with held-out patients on datasets whose samples carry patient ids.
        train: the training recipe (a ``train`` section) shared by every cell.
    """

    medical: str
    general: str | None = None
    datasets: tuple[str, ...] = ("embedded",)
    data: dict = field(default_factory=dict)
    strategies: tuple[str, ...] = STRATEGIES
    prompts: int = 10
    prompt_counts: tuple[int, ...] = PROMPT_COUNTS
    sweep: tuple[str, ...] = ()
    ood: bool = True
    holdout: float = 0.25
    train: dict = field(default_factory=lambda: load_recipe("adapt_bench")["train"])

    def __post_init__(self):
        unknown = sorted(set(self.strategies) - set(STRATEGIES))
        if unknown:
            raise UserError(f"adapt-bench: unknown strategies {unknown}; choose from {STRATEGIES}")
        if not checkpoint_exists(self.medical):
            raise UserError(f"adapt-bench: medical expert {self.medical} is not a medexplore checkpoint")
        missing = sorted(set(self.sweep) - set(self.datasets))
        if missing:
            raise UserError(f"adapt-bench: sweep datasets {missing} are not among the datasets {list(self.datasets)}")
        TrainConfig.from_dict(self.train)  # a bad recipe fails before anything runs


def bench_cells(spec: BenchSpec, has_patients: Callable[[str], bool] = lambda name: True) -> list[dict]:
    """Every cell of the grid, in run order (each a dict: dataset, strategy, prompts, protocol, key)."""
    cells = []
    for name in spec.datasets:
        strategies = [s for s in spec.strategies if s != "gmoe" or spec.general]
        for strategy in strategies:
            prompts = spec.prompts if strategy.startswith("vpt") else 0
            cells.append({"dataset": name, "strategy": strategy, "prompts": prompts, "protocol": "standard"})
        if name in spec.sweep:
            cells += [{"dataset": name, "strategy": "vpt_deep", "prompts": n, "protocol": "standard"}
                      for n in spec.prompt_counts if not ("vpt_deep" in strategies and n == spec.prompts)]
        if spec.ood and has_patients(name):
            cells += [{**c, "protocol": "patient_ood"} for c in cells if c["dataset"] == name and c["protocol"] == "standard"
                      and not (c["strategy"] == "vpt_deep" and c["prompts"] != spec.prompts)]
    for c in cells:
        c["key"] = f"{c['dataset']}/{c['strategy']}" + (f"-p{c['prompts']}" if c["prompts"] else "") + \
                   ("-ood" if c["protocol"] == "patient_ood" else "")
    return cells


def _mean_metric(metrics: dict, name: str) -> float:
    values = [m[name] for m in metrics.values() if isinstance(m, dict) and name in m]
    return float(np.mean(values)) if values else float("nan")


def _splits(spec: BenchSpec, name: str) -> dict[str, Dataset]:
    data = {**spec.data, "datasets": [name]}
    return {split: build_dataset(data, split) for split in ("train", "val", "test")}


def _has_patients(splits: dict[str, Dataset]) -> bool:
    try:
        patient_ids(splits["test"])
    except ValueError:
        return False
    return True


def _gate_shares(model, test: Dataset) -> dict:
    """Mean gate weight of each expert per modality on the test split (GMoE only)."""
    summary = summarize_mixing(gate_weights(model, test), by="modality")["mean"]
    return {modality: {e: round(float(v), 4) for e, v in row.items()} for modality, row in summary.iterrows()}


def _run_cell(spec: BenchSpec, cell: dict, splits: dict[str, Dataset], cell_dir: Path, callbacks, control) -> dict:
    """Adapt the medical expert as ``cell`` says, measure a step's memory, train it with the bench's recipe
    (:func:`~medexplore.train.workflow.run_training`, resumable) and score it; one row of ``results.csv``."""
    run_splits, ood_test = splits, None
    if cell["protocol"] == "patient_ood":
        seen, unseen, held = patient_split(splits, spec.holdout, seed=int(spec.data.get("seed", 0)))
        run_splits = seen
        ood_test = [unseen[s][i] for s in unseen for i in range(len(unseen[s]))]
    model, _ = load_model(Path(spec.medical))
    if model.adaptation is not None:
        raise UserError(f"{spec.medical}: the medical expert is already adapted ({model.adaptation['strategy']})")
    domains = dataset_domains(splits["train"])
    model.extend_domains([d.modality for d in domains], [d.body_part for d in domains])
    for task in dataset_tasks(splits["train"]):
        if task.name not in model.tasks:
            model.add_task(task)
    report = adapt_model(model, AdaptConfig(strategy=cell["strategy"], prompts=cell["prompts"],
                                            general=spec.general if cell["strategy"] == "gmoe" else None))
    train = run_splits["train"]
    memory = step_memory(model, collate([train[i] for i in range(min(len(train), int(spec.train.get("batch_size", 32))))]))
    resume = checkpoint_exists(cell_dir / "checkpoints" / "last")
    scored = any("auc" in kind_entry(t.kind).metrics for t in model.tasks.values())
    config = {"data": {"datasets": [cell["dataset"]]}, "train": {**spec.train, "monitor": "auc" if scored else "headline"}}
    start = time.perf_counter()
    outcome = run_training(config, cell_dir, resume=True, callbacks=callbacks, control=control, datasets=run_splits,
                           model=model)
    seconds = time.perf_counter() - start
    if outcome.result.stopped:
        raise RunStopped(f"adapt-bench stopped during {cell['key']}")
    metrics = outcome.test_metrics
    row = {**{k: cell[k] for k in ("key", "dataset", "strategy", "prompts", "protocol")},
           "auc": _mean_metric(metrics, "auc"), "acc": _mean_metric(metrics, "acc"), "dice": _mean_metric(metrics, "dice"),
           "trainable": report.trainable, "backbone_trainable": report.backbone_trainable, "total": report.total,
           "trainable_pct": round(100 * report.fraction, 3),
           "step_memory_mb": round(memory["total"] / 2 ** 20, 2),
           "activation_mb": round(memory["activations"] / 2 ** 20, 2), "seconds": round(seconds, 1),
           "resumed": resume, "metrics": json.dumps(metrics, default=float)}
    if ood_test is not None or cell["strategy"] == "gmoe":
        best, _ = load_model(final_checkpoint(cell_dir))
        if ood_test is not None:
            ood = evaluate(best, ood_test)
            row.update(ood_auc=_mean_metric(ood, "auc"), ood_drop=row["auc"] - _mean_metric(ood, "auc"),
                       held_out=" ".join(held))
        if cell["strategy"] == "gmoe":
            row["gates"] = json.dumps(_gate_shares(best, splits["test"]))
    return row


def run_adapt_bench(spec: BenchSpec, out: str | Path, callbacks: Sequence[Callable[[Event], None]] = (),
                    control: RunControl | None = None, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Run every cell not yet in ``out/results.csv``; returns the full table and writes the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        spec_file = out / "bench.json"
        stored = json.loads(spec_file.read_text()) if spec_file.exists() else None
        if stored is not None and stored != json.loads(json.dumps(asdict(spec))):
            changed = sorted(k for k in stored if stored[k] != json.loads(json.dumps(asdict(spec))).get(k))
            raise UserError(f"{out}: holds a bench with other settings ({changed}); choose another --out")
        spec_file.write_text(json.dumps(asdict(spec), indent=2))
        splits = {name: _splits(spec, name) for name in spec.datasets}
        cells = bench_cells(spec, lambda name: _has_patients(splits[name]))
        results = out / RESULTS
        done = set(pd.read_csv(results)["key"]) if results.exists() else set()
        for i, cell in enumerate(cells, 1):
            if cell["key"] in done:
                continue
            log(f"[{i}/{len(cells)}] {cell['key']}")
            row = _run_cell(spec, cell, splits[cell["dataset"]], out / "cells" / cell["key"].replace("/", "__"),
                            callbacks, control)
            frame = pd.DataFrame([row], columns=list(COLUMNS))
            frame.to_csv(results, mode="a", header=not results.exists(), index=False)
            log(f"    auc {row['auc']:.4f}  trainable {row['trainable']:,} ({row['trainable_pct']}%)  "
                f"{row['step_memory_mb']} MB  {row['seconds']} s")
        table = pd.read_csv(results)
        write_report(table, out, spec)
    return table


def write_report(table: pd.DataFrame, out: str | Path, spec: BenchSpec | None = None) -> tuple[Path, Path]:
    """``results.md`` (per-dataset tables, GMoE vs best single-expert adapter, OOD drop, gate shares)
    and ``adapt_bench.png`` (metric per strategy, prompt scaling, metric vs trainable parameters)."""
    out = Path(out)
    lines = ["# adapt-bench results", ""]
    standard = table[table["protocol"] == "standard"]
    for name, rows in standard.groupby("dataset", sort=False):
        lines += [f"## {name}", "", "| strategy | prompts | test AUC | test ACC | trainable (backbone) | % of all | "
                  "step memory MB | train s |", "|---|---|---|---|---|---|---|---|"]
        for _, r in rows.iterrows():
            lines.append(f"| {r.strategy} | {int(r.prompts) or ''} | {r.auc:.4f} | {r.acc:.4f} | {int(r.trainable):,} "
                         f"({int(r.backbone_trainable):,}) | {r.trainable_pct:.2f} | {r.step_memory_mb:.1f} | {r.seconds:.0f} |")
        single = rows[rows["strategy"].isin(["adapter", "lora", "vpt_shallow", "vpt_deep"])]
        gmoe = rows[rows["strategy"] == "gmoe"]
        if len(single) and len(gmoe):
            best = single.loc[single["auc"].idxmax()]
            lines += ["", f"GMoE-Adapter AUC {gmoe.auc.iloc[0]:.4f} vs best single-expert PEFT "
                          f"({best.strategy}) {best.auc:.4f}: {gmoe.auc.iloc[0] - best.auc:+.4f}"]
            if "gates" in gmoe and isinstance(gmoe["gates"].iloc[0], str):
                lines += ["", "Gate weight per modality (test split): " + gmoe["gates"].iloc[0]]
        lines.append("")
    ood = table[table["protocol"] == "patient_ood"]
    if len(ood):
        lines += ["## Patient-level out-of-distribution test", "",
                  "| dataset | strategy | held-out patients | AUC seen patients | AUC held-out patients | drop |",
                  "|---|---|---|---|---|---|"]
        for _, r in ood.iterrows():
            lines.append(f"| {r.dataset} | {r.strategy} | {r.held_out} | {r.auc:.4f} | {r.ood_auc:.4f} | {r.ood_drop:+.4f} |")
        lines.append("")
    md = out / "results.md"
    md.write_text("\n".join(lines))
    png = out / "adapt_bench.png"
    plot_adapt_bench(table).savefig(png, dpi=110, bbox_inches="tight")
    return md, png
