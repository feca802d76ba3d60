"""Mixing weights per sample: the Input Adaptformer's attention over domain latents, or gate weights.

Both are "how much of each component a sample draws on": a (N, K) table of non-negative weights,
the names of the K components and the group each belongs to (``dimensionality`` / ``modality`` /
``body_part`` for domain latents; ``expert`` for a GMoE gate). One table type and one summary serve
both, so the notebooks and the napari view plot gates with the same code as domain latents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.sample import Sample, collate
from ..errors import UserError
from ..models.medformer import Medformer
from .attribution import token_map_to_image
from .embeddings import sample_rows

__all__ = ["MixingWeights", "domain_attention", "domain_attention_maps", "gate_weights", "expert_names",
           "summarize_mixing"]

DOMAIN_GROUPS = ("dimensionality", "modality", "body_part")


@dataclass
class MixingWeights:
    """``weights`` (N, K) per sample, ``names`` of the K components, the ``groups`` they belong to,
    and one ``metadata`` row per sample (modality, body part, dimensionality, dataset...)."""

    weights: np.ndarray
    names: list[str]
    groups: list[str]
    metadata: pd.DataFrame

    def __post_init__(self):
        self.weights = np.asarray(self.weights, dtype=np.float64)
        if self.weights.ndim != 2 or self.weights.shape[1] != len(self.names) or len(self.names) != len(self.groups):
            raise UserError(f"MixingWeights: weights {self.weights.shape}, {len(self.names)} names and "
                             f"{len(self.groups)} groups do not match")
        if len(self.metadata) != len(self.weights):
            raise UserError(f"MixingWeights: {len(self.weights)} rows but {len(self.metadata)} metadata rows")
        if (self.weights < -1e-6).any():
            raise UserError("MixingWeights: weights must be non-negative")

    def by_group(self) -> pd.DataFrame:
        """(N, groups) total weight of each group's components per sample."""
        frame = pd.DataFrame(self.weights, columns=self.names)
        return frame.T.groupby(pd.Index(self.groups, name="group"), sort=False).sum().T

    def table(self) -> pd.DataFrame:
        """Metadata and per-component weights side by side, one row per sample."""
        return pd.concat([self.metadata.reset_index(drop=True), pd.DataFrame(self.weights, columns=self.names)], axis=1)


def summarize_mixing(mixing: MixingWeights, by: Sequence[str] | str = ("modality", "body_part"),
                     per: str = "group") -> pd.DataFrame:
    """Mean weight (and its standard deviation) per ``by`` value: of each ``group`` or each ``component``."""
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in by if c not in mixing.metadata.columns]
    if missing:
        raise KeyError(f"metadata has no column(s) {missing}; columns: {list(mixing.metadata.columns)}")
    if per not in ("group", "component"):
        raise UserError(f"per must be 'group' or 'component', got {per!r}")
    values = mixing.by_group() if per == "group" else pd.DataFrame(mixing.weights, columns=mixing.names)
    keys = [mixing.metadata[c].astype(str).reset_index(drop=True) for c in by]
    grouped = values.groupby(keys, sort=True)
    summary = grouped.mean()
    summary.columns = pd.MultiIndex.from_product([["mean"], summary.columns])
    spread = grouped.std(ddof=0)
    spread.columns = pd.MultiIndex.from_product([["std"], spread.columns])
    counts = grouped.size().rename(("n", ""))
    return pd.concat([summary, spread, counts], axis=1)


def _latent_groups(model: Medformer) -> tuple[list[str], list[str]]:
    if model.input_adaptformer is None:
        raise UserError("this model has no Input Adaptformer (input_adaptformer=False): no domain latents to show")
    names = list(model.input_adaptformer.latent_names)
    return names, [n.split("[")[0] for n in names]


@torch.no_grad()
def domain_attention(model: Medformer, dataset: Dataset | Sequence[Sample], batch_size: int = 128,
                     device="cpu") -> MixingWeights:
    """Each sample's mean (over its patch tokens) attention over its domain latents."""
    names, groups = _latent_groups(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    model.eval().to(device)
    weights, rows = [], []
    for batch in loader:
        out = model(batch.to(device), return_attention=True, tasks=[])
        per_sample = out.layout.per_sample(out.input_attention)
        weights.append(torch.stack([w.float().mean(0) for w in per_sample]).cpu())
        rows.extend(sample_rows(batch))
    if not rows:
        raise UserError("domain_attention: the dataset is empty")
    return MixingWeights(torch.cat(weights).numpy(), names, groups, pd.DataFrame(rows))


def expert_names(model: Medformer) -> list[str]:
    """Names of a GMoE-adapted model's experts; a ValueError for any other model."""
    adaptation = model.adaptation or {}
    if adaptation.get("strategy") != "gmoe":
        raise UserError("this model has no gated experts (adapt it with strategy gmoe to get gate weights)")
    return list(adaptation["expert_names"])


@torch.no_grad()
def gate_weights(model: Medformer, dataset: Dataset | Sequence[Sample], batch_size: int = 128,
                 device="cpu") -> MixingWeights:
    """Each sample's GMoE gate weights: one component per (block, expert), grouped by expert.

    Every block's weights sum to 1, and they are divided by the depth, so a row sums to 1 and
    ``by_group()`` gives each expert's share averaged over the blocks.
    """
    experts = expert_names(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    model.eval().to(device)
    weights, rows, blocks = [], [], []
    for batch in loader:
        out = model(batch.to(device), tasks=[])
        blocks = list(out.gates)
        weights.append(torch.cat([out.gates[b].float() for b in blocks], 1).cpu() / len(blocks))
        rows.extend(sample_rows(batch))
    if not rows:
        raise UserError("gate_weights: the dataset is empty")
    names = [f"{b}:{e}" for b in blocks for e in experts]
    return MixingWeights(torch.cat(weights).numpy(), names, experts * len(blocks), pd.DataFrame(rows))


@torch.no_grad()
def domain_attention_maps(model: Medformer, sample: Sample, device="cpu") -> dict[str, np.ndarray]:
    """Per latent group, each token's total attention on that group's latents, at image resolution."""
    _, groups = _latent_groups(model)
    model.eval().to(device)
    batch = collate([sample]).to(device)
    out = model(batch, return_attention=True, tasks=[])
    tokens = out.layout.per_sample(out.input_attention)[0].float()  # (n, L)
    grid = out.layout.groups[0].grid
    index = {g: [i for i, name in enumerate(groups) if name == g] for g in DOMAIN_GROUPS}
    spatial = tuple(sample.image.shape[1:])
    return {g: token_map_to_image(tokens[:, idx].sum(-1).reshape(grid).cpu(), spatial).numpy()
            for g, idx in index.items()}
