"""Embeddings of a dataset with one row of metadata per sample, saved and loaded as one file.

Each sample gives its pooled embedding, one embedding per task (its Output-Adaptformer queries,
averaged) and one per block (the block's tokens, pooled like the final embedding), together with a
metadata row: where it comes from, its domain, every label and every prediction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.sample import Sample, collate
from ..errors import UserError
from ..models.kinds import kind_entry, per_sample_predictions
from ..models.medformer import Medformer

__all__ = ["EmbeddingSet", "compute_embeddings", "iter_compute_embeddings", "load_embeddings", "label_columns"]

FORMAT = "medexplore-embeddings/1"


@dataclass
class EmbeddingSet:
    """Embeddings of ``N`` samples and their metadata.

    Attributes:
        pooled: (N, D) the model's pooled embedding.
        metadata: one row per sample (dataset, split, index, modality, body_part, dimensionality,
            patient_id, ``label:<task>``, ``pred:<task>``, ``correct:<task>`` / ``error:<task>``, and
            for a GMoE-adapted model ``gate:<expert>``, the expert's gate weight averaged over blocks).
        tasks: per task name, (N, D) the mean of its Output-Adaptformer queries.
        blocks: (N, depth, D) each block's pooled tokens, when asked for.
        info: free description (checkpoint, model) kept in the file.
    """

    pooled: np.ndarray
    metadata: pd.DataFrame
    tasks: dict[str, np.ndarray] = field(default_factory=dict)
    blocks: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.pooled)
        if len(self.metadata) != n:
            raise UserError(f"EmbeddingSet: {n} embeddings but {len(self.metadata)} metadata rows")
        for name, array in self.tasks.items():
            if len(array) != n:
                raise UserError(f"EmbeddingSet: task {name!r} has {len(array)} rows, expected {n}")
        if self.blocks is not None and len(self.blocks) != n:
            raise UserError(f"EmbeddingSet: blocks have {len(self.blocks)} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.pooled)

    def features(self, which: str = "pooled") -> np.ndarray:
        """(N, D) features: ``pooled``, ``task:<name>`` or ``block:<i>``."""
        if which == "pooled":
            return self.pooled
        kind, _, name = which.partition(":")
        if kind == "task" and name in self.tasks:
            return self.tasks[name]
        if kind == "block" and self.blocks is not None and name.lstrip("-").isdigit():
            return self.blocks[:, int(name)]
        choices = ["pooled", *(f"task:{t}" for t in self.tasks)]
        if self.blocks is not None:
            choices.append(f"block:0..{self.blocks.shape[1] - 1}")
        raise KeyError(f"no features {which!r}; available: {choices}")

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` file (no pickles: the metadata is stored as JSON)."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a directory; give a file name ending in .npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"pooled": self.pooled, **{f"task:{k}": v for k, v in self.tasks.items()}}
        if self.blocks is not None:
            arrays["blocks"] = self.blocks
        header = {"format": FORMAT, "info": self.info, "metadata": self.metadata.to_json(orient="split")}
        tmp = path.with_name(f".{path.name}.tmp.npz")
        try:
            np.savez_compressed(tmp, header=np.array(json.dumps(header, default=str)), **arrays)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def load_embeddings(path: str | Path) -> EmbeddingSet:
    """Read a file written by :meth:`EmbeddingSet.save`."""
    import io
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such embeddings file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a readable embeddings file ({exc})") from exc
    if "header" not in arrays or "pooled" not in arrays:
        raise UserError(f"{path}: not a medexplore embeddings file (no 'header'/'pooled' entries)")
    header = json.loads(str(arrays.pop("header")))
    if header.get("format") != FORMAT:
        raise UserError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    metadata = pd.read_json(io.StringIO(header["metadata"]), orient="split")
    tasks = {k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith("task:")}
    return EmbeddingSet(arrays["pooled"], metadata, tasks, arrays.get("blocks"), header.get("info", {}))


def label_columns(metadata: pd.DataFrame, prefix: str = "label:") -> list[str]:
    """Task names that have a ``<prefix><task>`` column."""
    return [c[len(prefix):] for c in metadata.columns if c.startswith(prefix)]


# ---------------------------------------------------------------------------- computing
class _Hooks:
    """Forward hooks that keep each block's tokens and each task's query outputs of one forward."""

    def __init__(self, model: Medformer, blocks: bool, tasks: bool):
        self.handles, self.blocks, self.tasks = [], [], {}
        if blocks:
            for block in model.blocks:
                self.handles.append(block.register_forward_hook(lambda m, a, out: self.blocks.append(out[0])))
        if tasks and model.output_adaptformer is not None:
            self.handles.append(model.output_adaptformer.register_forward_hook(
                lambda m, a, out: self.tasks.update(out[0])))

    def clear(self):
        self.blocks, self.tasks = [], {}

    def remove(self):
        for h in self.handles:
            h.remove()


def compute_embeddings(model: Medformer, dataset: Dataset | Sequence[Sample], batch_size: int = 128,
                       device="cpu", blocks: bool = False, tasks: bool = True, split: str | None = None,
                       progress: bool = True, info: dict | None = None) -> EmbeddingSet:
    """Embed every sample of ``dataset`` (streamed in batches) with its metadata and predictions.

    Args:
        blocks: also keep each block's pooled tokens, ``(N, depth, D)``.
        tasks: also keep each task's pooled Output-Adaptformer queries.
        split: written to the ``split`` column (default: ``dataset.split`` when it has one).
        progress: show a tqdm bar (GUIs iterate :func:`iter_compute_embeddings` instead).
    """
    steps = iter_compute_embeddings(model, dataset, batch_size, device, blocks, tasks, split, info)
    with tqdm(total=len(dataset), unit="img", desc="embedding", disable=not progress) as bar:
        while True:
            try:
                done, _ = next(steps)
            except StopIteration as stop:
                return stop.value
            bar.update(done - bar.n)


def iter_compute_embeddings(model: Medformer, dataset: Dataset | Sequence[Sample], batch_size: int = 128,
                            device="cpu", blocks: bool = False, tasks: bool = True, split: str | None = None,
                            info: dict | None = None) -> Iterator[tuple[int, int]]:
    """Checks the arguments, then returns a generator that yields ``(images done, total)`` after every
    batch and returns the :class:`EmbeddingSet` (see :func:`compute_embeddings`). Stop iterating (a GUI's
    cancel) and nothing more is computed."""
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise UserError("compute_embeddings: the dataset is empty")
    split = split if split is not None else getattr(dataset, "split", "")
    return _embedding_steps(model, dataset, batch_size, device, blocks, tasks, split, info)


def _embedding_steps(model, dataset, batch_size, device, blocks, tasks, split, info) -> Iterator[tuple[int, int]]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    model.eval().to(device)
    hooks = _Hooks(model, blocks, tasks)
    pooled, per_task, per_block, rows = [], {}, [], []
    done, total = 0, len(dataset)
    yield done, total
    try:
        for batch in loader:
            hooks.clear()
            with torch.no_grad():
                out = model(batch.to(device))
            pooled.append(out.embedding.float().cpu())
            for name, queries in hooks.tasks.items():
                per_task.setdefault(name, []).append(queries.mean(1).float().cpu())
            if blocks:
                pool = out.layout.prefix_pool if model.cls_token is not None else out.layout.mean_pool
                per_block.append(torch.stack([pool(x) for x in hooks.blocks], 1).float().cpu())
            rows.extend(_metadata_rows(model, batch, out, split))
            done += batch.num_samples
            yield done, total
    finally:
        hooks.remove()
    info = {"model": model.spec_dict(), **(info or {})}
    return EmbeddingSet(torch.cat(pooled).numpy(), pd.DataFrame(rows),
                        {k: torch.cat(v).numpy() for k, v in per_task.items()},
                        torch.cat(per_block).numpy() if blocks else None, info)


def sample_rows(batch) -> list[dict]:
    """One metadata row per sample of a collated batch: source dataset, index, domain, patient."""
    return [{"dataset": str(batch.meta["source"][i]), "index": batch.meta["index"][i], "modality": d.modality,
             "body_part": d.body_part, "dimensionality": d.dimensionality,
             "patient_id": str(batch.meta["patient_id"][i])} for i, d in enumerate(batch.domains)]


def _metadata_rows(model: Medformer, batch, out, split: str) -> list[dict]:
    rows = [{**row, "split": split} for row in sample_rows(batch)]
    if out.gates:  # GMoE: each expert's weight, averaged over the blocks
        mean_gate = torch.stack(list(out.gates.values())).float().mean(0).cpu()
        for e, name in enumerate(model.adaptation["expert_names"]):
            for row, value in zip(rows, mean_gate[:, e].tolist()):
                row[f"gate:{name}"] = value
    for name, spec in model.tasks.items():
        items = per_sample_predictions(spec.kind, out.predictions[name], batch.num_samples)
        labels = batch.targets.get(name, [None] * batch.num_samples)
        entry = kind_entry(spec.kind)
        for row, item, label, domain in zip(rows, items, labels, batch.domains):
            label_cell = None if label is None else entry.label_cell(label)
            pred_cell = None if item is None or not spec.applies_to(domain) else entry.prediction_cell(item)
            row[f"label:{name}"] = label_cell
            row[f"pred:{name}"] = pred_cell
            agreement = None if label_cell is None or pred_cell is None else entry.agreement(label_cell, pred_cell)
            if agreement is not None:
                row[f"{agreement[0]}:{name}"] = agreement[1]
    return rows
