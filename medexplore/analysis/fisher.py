"""Empirical Fisher information spectra (the analysis of IMAX).

For N samples with per-sample loss gradients g_i over a chosen parameter subset (P values), the
empirical Fisher is F = (1/N) sum g_i g_i^T (P x P). Its non-zero eigenvalues are those of the
N x N Gram matrix G = J J^T / N (J stacks the g_i as rows), which is cheap when N << P. Two numbers
summarise the spectrum: the dominant-eigenvalue ratio (largest over sum: how much one direction
dominates) and the spectral entropy of the normalised eigenvalues (how spread the curvature is).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..data.sample import Sample, collate
from ..errors import UserError
from ..models.medformer import Medformer
from ..models.packing import Batch
from ..models.tasks import TaskKind
from ..train.checkpoint import load_model

__all__ = ["FisherSpectrum", "select_parameters", "last_blocks", "per_sample_gradients", "fisher_spectrum",
           "spectrum_summary", "fisher_over_checkpoints"]

GRADIENT_METHODS = ("auto", "vmap", "loop")
CLASS_KINDS = (TaskKind.BINARY, TaskKind.MULTICLASS, TaskKind.ORDINAL)


@dataclass
class FisherSpectrum:
    """Eigenvalues (descending) of the empirical Fisher over ``num_params`` parameters and ``n`` samples."""

    eigenvalues: np.ndarray
    num_params: int
    n: int

    @property
    def dominant_ratio(self) -> float:
        return spectrum_summary(self.eigenvalues)["dominant_ratio"]

    @property
    def spectral_entropy(self) -> float:
        return spectrum_summary(self.eigenvalues)["spectral_entropy"]

    @property
    def trace(self) -> float:
        return float(self.eigenvalues.sum())


def spectrum_summary(eigenvalues: np.ndarray) -> dict:
    """``dominant_ratio`` = max / sum and ``spectral_entropy`` = -sum p log p (nats), p = lambda / sum."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    total = lam.sum()
    if total <= 0:
        return {"dominant_ratio": float("nan"), "spectral_entropy": float("nan"), "trace": 0.0}
    p = lam[lam > 0] / total
    return {"dominant_ratio": float(lam.max() / total), "spectral_entropy": float(-(p * np.log(p)).sum()),
            "trace": float(total)}


def select_parameters(model: Medformer, prefixes: Sequence[str] | Callable[[str], bool]) -> dict[str, Tensor]:
    """Named parameters whose name starts with one of ``prefixes`` (or satisfies a predicate)."""
    if callable(prefixes):
        chosen = {n: p for n, p in model.named_parameters() if prefixes(n)}
    else:
        prefixes = tuple(prefixes)
        chosen = {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}
    if not chosen:
        raise UserError(f"no parameter matches {prefixes!r}; e.g. {[n for n, _ in model.named_parameters()][:5]}")
    return chosen


def last_blocks(model: Medformer, k: int = 2) -> list[str]:
    """Parameter-name prefixes of the last ``k`` blocks, e.g. ``['blocks.10.', 'blocks.11.']``."""
    if not 1 <= k <= len(model.blocks):
        raise UserError(f"k must be in 1..{len(model.blocks)}, got {k}")
    return [f"blocks.{i}." for i in range(len(model.blocks) - k, len(model.blocks))]


def _sample_loss(model: Medformer, sample: Sample) -> Tensor:
    batch = collate([sample], tasks=[t for t in sample.labels if t in model.tasks]).to(model.norm.weight.device)
    loss, _ = model.compute_loss(model(batch), batch)
    return loss


def _loop_gradients(model: Medformer, samples: Sequence[Sample], params: dict[str, Tensor], out: Tensor) -> None:
    tensors = list(params.values())
    for i, s in enumerate(samples):
        grads = torch.autograd.grad(_sample_loss(model, s), tensors, allow_unused=True)
        torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, tensors)],
                  out=out[i])


def _label_key(value) -> tuple:
    t = torch.as_tensor(value)
    return tuple(t.shape), str(t.dtype), t.cpu().numpy().tobytes()


def _vmap_gradients(model: Medformer, samples: Sequence[Sample], params: dict[str, Tensor], chunk: int,
                    out: Tensor) -> None:
    """Per-sample gradients with ``torch.func``: samples sharing image shape, domain and labels are vmapped
    over their images together (labels are checked by the heads in Python, so they stay constants)."""
    from torch.func import functional_call, grad, vmap

    buffers = dict(model.named_buffers())
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    names = list(params)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        labels = tuple((t, _label_key(s.labels[t])) for t in sorted(s.labels) if t in model.tasks)
        groups.setdefault((tuple(s.image.shape), s.domain, labels), []).append(i)
    device = model.norm.weight.device
    for (_, domain, _), idx in groups.items():
        first = samples[idx[0]]
        targets = {t: [first.labels[t]] for t in first.labels if t in model.tasks}

        def loss_of(theta: dict, image: Tensor) -> Tensor:
            batch = Batch.from_images([image], [domain], targets)
            output = functional_call(model, ({**frozen, **theta}, buffers), (batch,))
            return model.compute_loss(output, batch)[0]

        theta = {n: p.detach() for n, p in params.items()}
        images = torch.stack([samples[i].image for i in idx]).to(device)
        with warnings.catch_warnings():  # SDPA has no batching rule on CPU: functorch loops, correctly
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            grads = vmap(grad(loss_of), in_dims=(None, 0), chunk_size=chunk)(theta, images)
        out[idx] = torch.cat([grads[n].reshape(len(idx), -1).float() for n in names], 1)


def per_sample_gradients(model: Medformer, samples: Sequence[Sample], params: dict[str, Tensor],
                         method: str = "auto", chunk: int = 32) -> Tensor:
    """(N, P) gradient of each sample's own multitask loss (over its labels) w.r.t. ``params``.

    ``vmap`` uses ``torch.func`` over the images of samples that share shape, domain and labels;
    ``loop`` one backward pass per sample; ``auto`` takes vmap when every label is a class index
    (then samples share labels and vmap batches them) and no task is detection (its box targets are
    built per sample in Python). Dropout and stochastic depth are off (eval mode).
    """
    if method not in GRADIENT_METHODS:
        raise UserError(f"method must be one of {GRADIENT_METHODS}, got {method!r}")
    if not samples:
        raise UserError("per_sample_gradients: no samples")
    unlabeled = [i for i, s in enumerate(samples) if not any(t in model.tasks for t in s.labels)]
    if unlabeled:
        raise UserError(f"sample(s) {unlabeled[:5]} carry no label of the model's tasks {sorted(model.tasks)}")
    if method == "auto":
        used = {t for s in samples for t in s.labels if t in model.tasks}
        method = "vmap" if all(model.tasks[t].kind in CLASS_KINDS for t in used) else "loop"
    was_training = model.training
    model.eval()
    out = torch.empty(len(samples), sum(p.numel() for p in params.values()), device=model.norm.weight.device)
    try:
        if method == "loop":
            _loop_gradients(model, samples, params, out)
        else:
            _vmap_gradients(model, samples, params, chunk, out)
    finally:
        model.train(was_training)
    return out


def _gram(jac: Tensor, columns: int = 1 << 16) -> Tensor:
    """J J^T in float64, accumulated over column blocks (memory: one block, not a float64 copy of J)."""
    gram = torch.zeros(jac.shape[0], jac.shape[0], dtype=torch.float64, device=jac.device)
    for start in range(0, jac.shape[1], columns):
        block = jac[:, start:start + columns].double()
        gram += block @ block.T
    return gram


def fisher_spectrum(model: Medformer, samples: Sequence[Sample], params: Sequence[str] | Callable | None = None,
                    method: str = "auto", chunk: int = 32) -> FisherSpectrum:
    """Eigenvalues of the empirical Fisher over ``params`` (default: the last two blocks) via the Gram matrix."""
    chosen = select_parameters(model, params if params is not None else last_blocks(model, min(2, len(model.blocks))))
    jac = per_sample_gradients(model, list(samples), chosen, method, chunk)
    if not torch.isfinite(jac).all():
        raise UserError("per-sample gradients contain NaN/Inf; check the samples' labels and the checkpoint")
    n = jac.shape[0]
    eigenvalues = torch.linalg.eigvalsh(_gram(jac) / n).flip(0).clamp_min(0).cpu().numpy()
    return FisherSpectrum(eigenvalues, jac.shape[1], n)


def fisher_over_checkpoints(checkpoints: Sequence[tuple[int, str | Path]], samples: Sequence[Sample],
                            params: Sequence[str] | Callable | None = None, method: str = "auto",
                            device="cpu", progress: bool = True) -> pd.DataFrame:
    """Spectrum summary at each ``(step, checkpoint folder)`` (see ``list_snapshots``), one row each."""
    from tqdm.auto import tqdm

    rows = []
    for step, folder in tqdm(list(checkpoints), desc="fisher", disable=not progress):
        model, _ = load_model(Path(folder), device)
        spectrum = fisher_spectrum(model, samples, params, method)
        summary = spectrum_summary(spectrum.eigenvalues)
        rows.append({"step": int(step), "checkpoint": str(folder), **summary,
                     "lambda_max": float(spectrum.eigenvalues[0]), "effective_rank": math.exp(summary["spectral_entropy"]),
                     "n": spectrum.n, "num_params": spectrum.num_params})
    return pd.DataFrame(rows)
