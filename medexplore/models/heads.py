"""Task heads and their masked losses, one class per family of task kinds.

Every head maps its task's Output-Adaptformer queries ``(S, Q, D)`` to a prediction and computes
its loss from per-sample labels, ``None`` where a sample lacks the label. A head whose task has no
label in the batch returns ``None`` for the loss.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import center_size_to_corners, generalized_box_iou, hungarian_match
from .packing import Batch, TokenLayout
from .segmentation import MultiScaleDecoder
from .tasks import TaskKind, TaskSpec

__all__ = ["HeadContext", "TaskHead", "build_head", "LabelError"]


class LabelError(ValueError):
    """A label whose shape, type or value does not fit its task."""


@dataclass
class HeadContext:
    """What heads beyond a linear readout need: the layout, the batch and intermediate token maps."""

    layout: TokenLayout
    batch: Batch
    features: list[Tensor]  # packed (T, D) token states, shallow to deep


class TaskHead(nn.Module):
    def __init__(self, spec: TaskSpec):
        super().__init__()
        self.spec = spec

    def present(self, labels: list) -> tuple[list[int], list[Tensor]]:
        """Indices and tensors of the samples that carry a label."""
        idx = [i for i, y in enumerate(labels) if y is not None]
        return idx, [torch.as_tensor(labels[i]) for i in idx]

    def _error(self, sample: int, message: str) -> LabelError:
        return LabelError(f"task {self.spec.name!r} ({self.spec.kind.value}), sample {sample}: {message}")


class VectorHead(TaskHead):
    """Binary, multiclass, multilabel and regression: LayerNorm + Linear on the mean task query."""

    def __init__(self, spec: TaskSpec, dim: int):
        super().__init__(spec)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, 1 if spec.kind == TaskKind.BINARY else spec.num_outputs)

    def forward(self, queries: Tensor, ctx: HeadContext) -> Tensor:
        out = self.fc(self.norm(queries.mean(1)))
        return out[:, 0] if self.spec.kind == TaskKind.BINARY else out

    def labels_tensor(self, labels: list, device) -> tuple[Tensor, Tensor] | None:
        idx, ys = self.present(labels)
        if not idx:
            return None
        kind, n = self.spec.kind, self.spec.num_outputs
        checked = []
        for i, y in zip(idx, ys):
            if kind in (TaskKind.BINARY, TaskKind.MULTICLASS, TaskKind.ORDINAL):
                if y.numel() != 1:
                    raise self._error(i, f"expected one class index, got shape {tuple(y.shape)}")
                y = y.reshape(())
                top = 2 if kind == TaskKind.BINARY else n
                if not (0 <= float(y) < top) or float(y) != int(y):
                    raise self._error(i, f"class {y.item()} is outside 0..{top - 1}")
            elif y.numel() != n:
                raise self._error(i, f"expected {n} values, got shape {tuple(y.shape)}")
            checked.append(y.reshape(-1) if kind in (TaskKind.MULTILABEL, TaskKind.REGRESSION) else y)
        return torch.tensor(idx, device=device), torch.stack(checked).to(device)

    def loss(self, prediction: Tensor, labels: list) -> Tensor | None:
        found = self.labels_tensor(labels, prediction.device)
        if found is None:
            return None
        idx, y = found
        pred = prediction[idx]
        kind = self.spec.kind
        if kind == TaskKind.BINARY:
            return F.binary_cross_entropy_with_logits(pred, y.float())
        if kind == TaskKind.MULTICLASS:
            return F.cross_entropy(pred, y.long())
        y = y.float()
        known = ~torch.isnan(y)  # multilabel / regression: NaN marks a missing entry
        if not known.any():
            return None
        if kind == TaskKind.MULTILABEL:
            return F.binary_cross_entropy_with_logits(pred[known], y[known])
        if self.spec.loss == "mse":
            return F.mse_loss(pred[known], y[known])
        return F.smooth_l1_loss(pred[known], y[known])


class OrdinalHead(VectorHead):
    """CORAL ordinal regression: one shared projection and ``K - 1`` ordered thresholds."""

    def __init__(self, spec: TaskSpec, dim: int):
        TaskHead.__init__(self, spec)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, 1, bias=False)
        # thresholds = first - cumsum(softplus(gaps)): strictly decreasing whatever the parameters, so
        # P(grade > k) never increases with k (start: evenly spaced from 1 to -1)
        k = spec.num_outputs - 1
        gap = 2.0 / max(k - 1, 1)
        self.first_threshold = nn.Parameter(torch.tensor(1.0))
        self.threshold_gaps = nn.Parameter(torch.full((k - 1,), math.log(math.expm1(gap))))

    @property
    def thresholds(self) -> Tensor:
        steps = F.softplus(self.threshold_gaps).cumsum(0)
        return torch.cat([self.first_threshold[None], self.first_threshold - steps])

    def forward(self, queries: Tensor, ctx: HeadContext) -> Tensor:
        """(S, K - 1) cumulative logits: logit k is P(grade > k), decreasing in k."""
        return self.fc(self.norm(queries.mean(1))) + self.thresholds

    def loss(self, prediction: Tensor, labels: list) -> Tensor | None:
        found = self.labels_tensor(labels, prediction.device)
        if found is None:
            return None
        idx, grade = found
        levels = torch.arange(self.spec.num_outputs - 1, device=prediction.device)
        return F.binary_cross_entropy_with_logits(prediction[idx], (grade.long()[:, None] > levels).float())

    @staticmethod
    def grade(prediction: Tensor) -> Tensor:
        return (prediction > 0).sum(-1)


class SegmentationHead(TaskHead):
    """Per-pixel embeddings from a multi-scale decoder, classified by the task's class queries.

    Prediction: for every image group, ``(sample_ids, logits (B, C, *size))``.
    """

    def __init__(self, spec: TaskSpec, dim: int, in_chans: int, patch_size: int, channels: int,
                 num_features: int):
        super().__init__(spec)
        self.decoders = nn.ModuleDict({d: MultiScaleDecoder(2 if d == "2d" else 3, dim, in_chans, patch_size,
                                                            channels, num_features, channels)
                                       for d in spec.dimensionalities})
        self.class_embed = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, channels))
        self.class_bias = nn.Parameter(torch.zeros(spec.num_outputs))

    def forward(self, queries: Tensor, ctx: HeadContext) -> list[tuple[Tensor, Tensor]]:
        classes = self.class_embed(queries[:, :self.spec.num_outputs])  # (S, C, E)
        out = []
        for g, group in enumerate(ctx.layout.groups):
            key = f"{len(group.grid)}d"
            if key not in self.decoders:
                continue
            feats = [ctx.layout.group_grid(f, g) for f in ctx.features]
            pixels = self.decoders[key](feats, ctx.batch.groups[g])  # (B, E, *size)
            logits = torch.einsum("be...,bce->bc...", pixels, classes[group.sample_ids])
            out.append((group.sample_ids, logits + self.class_bias.view(1, -1, *[1] * len(group.grid))))
        return out

    def loss(self, prediction: list[tuple[Tensor, Tensor]], labels: list) -> Tensor | None:
        losses, weights = [], []
        for sample_ids, logits in prediction:
            rows = [r for r, s in enumerate(sample_ids.tolist()) if labels[s] is not None]
            if not rows:
                continue
            masks = []
            for r in rows:
                s = int(sample_ids[r])
                m = torch.as_tensor(labels[s])
                if tuple(m.shape) != tuple(logits.shape[2:]):
                    raise self._error(s, f"mask shape {tuple(m.shape)} differs from the image's {tuple(logits.shape[2:])}")
                masks.append(m)
            target = torch.stack(masks).to(logits.device).long()
            if target.min() < 0 or target.max() >= self.spec.num_outputs:
                raise self._error(int(sample_ids[rows[0]]), f"mask values must be in 0..{self.spec.num_outputs - 1}, "
                                  f"got {int(target.min())}..{int(target.max())}")
            sel = logits[rows]
            losses.append(F.cross_entropy(sel, target) + _soft_dice_loss(sel, target))
            weights.append(len(rows))
        if not losses:
            return None
        w = torch.tensor(weights, dtype=losses[0].dtype, device=losses[0].device)
        return (torch.stack(losses) * w).sum() / w.sum()

    @staticmethod
    def per_sample(prediction: list[tuple[Tensor, Tensor]], num_samples: int) -> list[Tensor | None]:
        out: list[Tensor | None] = [None] * num_samples
        for ids, logits in prediction:
            for r, s in enumerate(ids.tolist()):
                out[s] = logits[r]
        return out


def _soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    """1 - mean soft Dice over classes (background included), the DiceCE convention of MONAI."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    axes = tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


class DetectionHead(TaskHead):
    """Up to K boxes per image from K queries: box (center/size, normalised) and a presence logit.

    Prediction: ``{"boxes": [(K, 2d) per sample, in pixels], "logits": (S, K)}`` plus the same boxes
    normalised to [0, 1] and each sample's pixel scale. Loss: Hungarian
    matching, then L1 + generalised IoU on matched boxes and BCE on presence.
    """

    def __init__(self, spec: TaskSpec, dim: int, l1_weight: float = 5.0, giou_weight: float = 2.0):
        super().__init__(spec)
        self.l1_weight, self.giou_weight = l1_weight, giou_weight
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.box = nn.ModuleDict({d: nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 4 if d == "2d" else 6))
                                  for d in spec.dimensionalities})
        self.presence = nn.Linear(dim, 1)

    def forward(self, queries: Tensor, ctx: HeadContext) -> dict:
        q = self.norm(queries[:, :self.spec.num_outputs])
        boxes: list[Tensor | None] = [None] * q.shape[0]
        normalized: list[Tensor | None] = [None] * q.shape[0]
        scales: list[Tensor | None] = [None] * q.shape[0]
        for group in ctx.layout.groups:
            key = f"{len(group.grid)}d"
            if key not in self.box:
                continue
            unit = center_size_to_corners(self.box[key](q[group.sample_ids]).sigmoid()).clamp(0, 1)  # inside the image
            scale = torch.tensor(group.image_shape, dtype=unit.dtype, device=unit.device).repeat(2)
            for r, s in enumerate(group.sample_ids.tolist()):
                normalized[s], scales[s] = unit[r], scale
                boxes[s] = unit[r] * scale
        return {"boxes": boxes, "normalized": normalized, "scale": scales, "logits": self.presence(q)[..., 0]}

    def loss(self, prediction: dict, labels: list) -> Tensor | None:
        idx, ys = self.present(labels)
        if not idx:
            return None
        logits = prediction["logits"]
        l1, giou, presence = [], [], []
        for i, y in zip(idx, ys):
            unit = prediction["normalized"][i]
            if unit is None:
                raise self._error(i, "the task does not apply to this sample's dimensionality")
            d2 = unit.shape[-1]
            if y.dim() != 2 or y.shape[-1] != d2 or y.shape[0] > self.spec.num_outputs:
                raise self._error(i, f"expected boxes of shape (M <= {self.spec.num_outputs}, {d2}), got {tuple(y.shape)}")
            target = (y.to(unit) / prediction["scale"][i]).clamp(0, 1)
            rows, cols = hungarian_match(unit, logits[i], target)
            present = torch.zeros_like(logits[i])
            present[rows] = 1.0
            presence.append(F.binary_cross_entropy_with_logits(logits[i], present))
            if len(rows):
                l1.append(F.l1_loss(unit[rows], target[cols], reduction="sum") / d2)
                giou.append((1 - generalized_box_iou(unit[rows], target[cols]).diagonal()).sum())
        n_boxes = max(1, sum(len(y) for y in ys))
        total = torch.stack(presence).mean()
        if l1:
            total = total + self.l1_weight * torch.stack(l1).sum() / n_boxes + self.giou_weight * torch.stack(giou).sum() / n_boxes
        return total


def build_head(spec: TaskSpec, dim: int, in_chans: int, patch_size: int, seg_channels: int,
               num_features: int) -> TaskHead:
    """The head for ``spec.kind``, fully built (never lazily)."""
    if spec.kind == TaskKind.ORDINAL:
        return OrdinalHead(spec, dim)
    if spec.kind == TaskKind.SEGMENTATION:
        return SegmentationHead(spec, dim, in_chans, patch_size, seg_channels, num_features)
    if spec.kind == TaskKind.DETECTION:
        return DetectionHead(spec, dim)
    return VectorHead(spec, dim)
