"""Task heads and their masked losses, one class per family of task kinds.

Every head maps its task's Output-Adaptformer queries ``(S, Q, D)`` to a prediction and computes
its loss from per-sample labels, ``None`` where a sample lacks the label. A head whose task has no
label in the batch returns ``None`` for the loss. ``smoothing`` (label smoothing) moves the class
targets of binary, multiclass, multilabel and ordinal tasks towards uniform; masks, boxes and
regression values are never smoothed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .boxes import center_size_to_corners, generalized_box_iou
from .packing import Batch, TokenLayout
from .segmentation import MultiScaleDecoder
from .tasks import TaskKind, TaskSpec

__all__ = ["HeadContext", "TaskHead", "VectorHead", "OrdinalHead", "SegmentationHead", "DetectionHead", "LabelError"]


class LabelError(UserError):
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

    def loss(self, prediction, labels: list) -> Tensor | None:
        """The masked loss over the samples that carry a label (None when none does); heads whose targets
        can be smoothed also take ``smoothing``."""
        raise NotImplementedError

    def _error(self, sample: int, message: str) -> LabelError:
        return LabelError(f"task {self.spec.name!r} ({self.spec.kind.value}), sample {sample}: {message}")


def _smoothed(target: Tensor, smoothing: float) -> Tensor:
    """Binary targets moved towards 1/2: 0 -> smoothing / 2, 1 -> 1 - smoothing / 2."""
    return target * (1 - smoothing) + smoothing / 2 if smoothing else target


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

    def loss(self, prediction: Tensor, labels: list, smoothing: float = 0.0) -> Tensor | None:
        found = self.labels_tensor(labels, prediction.device)
        if found is None:
            return None
        idx, y = found
        pred = prediction[idx]
        kind = self.spec.kind
        if kind == TaskKind.BINARY:
            return F.binary_cross_entropy_with_logits(pred, _smoothed(y.float(), smoothing))
        if kind == TaskKind.MULTICLASS:
            return F.cross_entropy(pred, y.long(), label_smoothing=smoothing)
        y = y.float()
        known = ~torch.isnan(y)  # multilabel / regression: NaN marks a missing entry
        if not known.any():
            return None
        if kind == TaskKind.MULTILABEL:
            return F.binary_cross_entropy_with_logits(pred[known], _smoothed(y[known], smoothing))
        loss = {"mse": F.mse_loss, "l1": F.l1_loss}.get(self.spec.loss, F.smooth_l1_loss)
        return loss(pred[known], y[known])


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

    def loss(self, prediction: Tensor, labels: list, smoothing: float = 0.0) -> Tensor | None:
        found = self.labels_tensor(labels, prediction.device)
        if found is None:
            return None
        idx, grade = found
        levels = torch.arange(self.spec.num_outputs - 1, device=prediction.device)
        above = (grade.long()[:, None] > levels).float()
        return F.binary_cross_entropy_with_logits(prediction[idx], _smoothed(above, smoothing))

    @staticmethod
    def grade(prediction: Tensor) -> Tensor:
        return (prediction > 0).sum(-1)


class SegmentationHead(TaskHead):
    """Per-pixel embeddings from a multi-scale decoder, classified by the task's class queries.

    Prediction: for every image group, ``(sample_ids, logits (B, C, *size))``.
    """

    def __init__(self, spec: TaskSpec, dim: int, in_chans: int, patch_sizes: dict[int, int], channels: int,
                 num_features: int, full_channels: int | None = None):
        super().__init__(spec)
        dims = {d: 2 if d == "2d" else 3 for d in spec.dimensionalities}
        self.decoders = nn.ModuleDict({d: MultiScaleDecoder(n, dim, in_chans, patch_sizes[n], channels, num_features,
                                                            channels, full_channels) for d, n in dims.items()})
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
    """Up to K boxes per image, predicted densely on the patch grid (CenterNet style).

    Every patch token, conditioned on the task's queries, scores "a box is centred in my patch" and
    regresses that box: its centre within one patch of the token's own and its size as a fraction of
    the image. The K best-scoring tokens, skipping any whose box overlaps an already chosen one by
    IoU > ``nms_iou``, are the prediction:
    ``{"boxes": [(K, 2d) per sample, in pixels], "logits": (S, K)}`` plus the same boxes normalised to
    [0, 1], each sample's pixel scale, and the dense maps for the loss. Loss: focal loss on every
    token's score (positive: the token holding a box centre), L1 + generalised IoU on those tokens'
    boxes. Dense targets train in hundreds of steps; set-to-set (DETR) matching of K free queries
    left boxes at mAP 0 within the demo's budget.
    """

    def __init__(self, spec: TaskSpec, dim: int, l1_weight: float = 5.0, giou_weight: float = 2.0,
                 nms_iou: float = 0.5):
        super().__init__(spec)
        self.l1_weight, self.giou_weight, self.nms_iou = l1_weight, giou_weight, nms_iou
        self.condition = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.box = nn.ModuleDict({d: nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1 + 2 * int(d[0])))
                                  for d in spec.dimensionalities})
        for layer in self.box.values():  # start with few, mid-sized boxes: score prior 0.01, size 1/4 of the image
            nn.init.constant_(layer[-1].bias, 0.0)
            layer[-1].bias.data[0] = -math.log(99.0)
            layer[-1].bias.data[1 + int(layer[-1].out_features // 2):] = math.log(0.25 / 0.75)

    def _dense(self, tokens: Tensor, grid: tuple[int, ...], key: str) -> tuple[Tensor, Tensor]:
        """(B, n) scores and (B, n, 2d) unit boxes of a group's (B, n, D) conditioned tokens."""
        out = self.box[key](self.norm(tokens))
        d = len(grid)
        size = torch.tensor(grid, dtype=out.dtype, device=out.device)
        cells = torch.stack(torch.meshgrid(*[torch.arange(g, device=out.device) for g in grid], indexing="ij"), -1)
        centre = (cells.reshape(-1, d).to(out.dtype) + 0.5 + torch.tanh(out[..., 1:1 + d])) / size
        unit = center_size_to_corners(torch.cat([centre, out[..., 1 + d:].sigmoid()], -1)).clamp(0, 1)
        return out[..., 0], unit

    def _select(self, scores: Tensor, unit: Tensor) -> tuple[Tensor, Tensor]:
        """The K best (B, K) scores and (B, K, 2d) boxes, greedily skipping overlapping boxes."""
        k = min(self.spec.num_outputs, scores.shape[1])
        free = torch.ones_like(scores, dtype=torch.bool)
        rows = torch.arange(len(scores), device=scores.device)
        picked = []
        with torch.no_grad():
            for _ in range(k):
                best = scores.masked_fill(~free, float("-inf")).argmax(1)
                picked.append(best)
                free[rows, best] = False
                free &= _pairwise_iou(unit, unit[rows, best][:, None]) <= self.nms_iou
        index = torch.stack(picked, 1)
        return scores.gather(1, index), unit.gather(1, index[..., None].expand(-1, -1, unit.shape[-1]))

    def forward(self, queries: Tensor, ctx: HeadContext) -> dict:
        condition = self.condition(queries.mean(1))  # (S, D)
        n = queries.shape[0]
        boxes: list[Tensor | None] = [None] * n
        normalized: list[Tensor | None] = [None] * n
        scales: list[Tensor | None] = [None] * n
        logits = queries.new_full((n, self.spec.num_outputs), -1e4)
        dense = []
        for g, group in enumerate(ctx.layout.groups):
            key = f"{len(group.grid)}d"
            if key not in self.box:
                continue
            tokens = ctx.layout.group_tokens(ctx.features[-1], g) + condition[group.sample_ids][:, None]
            scores, unit = self._dense(tokens, group.grid, key)
            dense.append((group.sample_ids, group.grid, scores, unit))
            top_scores, top_unit = self._select(scores, unit)
            logits = logits.index_copy(0, group.sample_ids, F.pad(top_scores, (0, logits.shape[1] - top_scores.shape[1]),
                                                                  value=-1e4))
            scale = torch.tensor(group.image_shape, dtype=unit.dtype, device=unit.device).repeat(2)
            for r, s in enumerate(group.sample_ids.tolist()):
                normalized[s], scales[s] = top_unit[r], scale
                boxes[s] = top_unit[r] * scale
        return {"boxes": boxes, "normalized": normalized, "scale": scales, "logits": logits, "dense": dense}

    def loss(self, prediction: dict, labels: list) -> Tensor | None:
        idx, ys = self.present(labels)
        if not idx:
            return None
        wanted = dict(zip(idx, ys))
        focal, l1, giou, n_boxes = [], [], [], 0
        for sample_ids, grid, scores, unit in prediction["dense"]:
            for r, s in enumerate(sample_ids.tolist()):
                if s not in wanted:
                    continue
                y, d2 = wanted.pop(s), unit.shape[-1]
                if y.dim() != 2 or y.shape[-1] != d2 or y.shape[0] > self.spec.num_outputs:
                    raise self._error(s, f"expected boxes of shape (M <= {self.spec.num_outputs}, {d2}), "
                                         f"got {tuple(y.shape)}")
                target = (y.to(unit) / prediction["scale"][s]).clamp(0, 1)
                size = torch.tensor(grid, device=unit.device)
                cell = (((target[:, :d2 // 2] + target[:, d2 // 2:]) / 2) * size).long().clamp(max=size - 1)
                flat = _flat_index(cell, grid)
                present = torch.zeros_like(scores[r])
                present[flat] = 1.0
                focal.append(_focal_loss(scores[r], present))
                if len(flat):
                    l1.append(F.l1_loss(unit[r, flat], target, reduction="sum") / d2)
                    giou.append((1 - generalized_box_iou(unit[r, flat], target).diagonal()).sum())
                    n_boxes += len(flat)
        if wanted:
            raise self._error(next(iter(wanted)), "the task does not apply to this sample's dimensionality")
        total = torch.stack(focal).sum() / max(1, n_boxes)
        if l1:
            total = total + (self.l1_weight * torch.stack(l1).sum() + self.giou_weight * torch.stack(giou).sum()) / n_boxes
        return total


def _flat_index(cells: Tensor, grid: tuple[int, ...]) -> Tensor:
    """Row-major index of (M, d) integer cells in ``grid``."""
    index = torch.zeros(len(cells), dtype=torch.long, device=cells.device)
    for axis, extent in enumerate(grid):
        index = index * extent + cells[:, axis]
    return index


def _focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Summed sigmoid focal loss (Lin et al. 2017)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return (weight * (1 - p_t) ** gamma * ce).sum()


def _pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of broadcastable (..., 2d) boxes, element by element."""
    d = a.shape[-1] // 2
    inter = (torch.minimum(a[..., d:], b[..., d:]) - torch.maximum(a[..., :d], b[..., :d])).clamp(min=0).prod(-1)
    volume = lambda x: (x[..., d:] - x[..., :d]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (volume(a) + volume(b) - inter + 1e-7)
