"""Figures: training curves from ``metrics.jsonl`` and a gallery of predictions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..models.kinds import headline_of

__all__ = ["training_curves", "prediction_gallery", "read_metrics", "display_image"]



def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics file (has the run finished an epoch?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_curves(records: list[dict]) -> Figure:
    """Left: training loss per task by epoch; right: each task's headline validation metric."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_val = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in records]
    for key in sorted({k for r in records for k in r.get("train", {})}):
        ax_loss.plot(epochs, [r["train"].get(key, np.nan) for r in records], marker="o", ms=3, label=key)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss per task")
    ax_loss.legend(fontsize=7)
    for task in sorted({t for r in records for t in r.get("val", {})}):
        metric = headline_of([r["val"].get(task, {}) for r in records])
        if metric:
            ax_val.plot(epochs, [r["val"].get(task, {}).get(metric, np.nan) for r in records], marker="o", ms=3,
                        label=f"{task} ({metric})")
    ax_val.set(xlabel="epoch", ylabel="validation", title="validation metrics")
    ax_val.legend(fontsize=7)
    return fig


def _middle_slice(array: np.ndarray, spatial_dims: int, depth: int | None = None) -> np.ndarray:
    """A 3D array's slice ``depth`` along z (default: the middle one); 2D arrays unchanged."""
    if spatial_dims != 3:
        return array
    return array[..., array.shape[-3] // 2 if depth is None else depth, :, :]


def _most_marked_slice(mask) -> int | None:
    """The z slice with the most foreground voxels of a 3D mask (None without foreground)."""
    if mask is None:
        return None
    counts = (np.asarray(mask) > 0).sum(axis=(-2, -1))
    return int(counts.argmax()) if counts.max() > 0 else None


def display_image(image: np.ndarray) -> np.ndarray:
    """A (C, H, W) or (H, W) image as imshow shows it well: RGB or grey, 1st-99th percentile to [0, 1] (the full
    range where those are equal)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
    lo, hi = np.percentile(image, [1, 99])
    if hi - lo < 1e-6:  # sparse content (a mask volume's edge slice): the full range, not a black image
        lo, hi = float(image.min()), float(image.max())
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)


def _show_image(ax, image: np.ndarray, depth: int | None = None) -> None:
    ax.imshow(display_image(_middle_slice(image, image.ndim - 1, depth)), cmap="gray")


def _draw_boxes(ax, boxes: np.ndarray, dims: int, depth: int | None, color: str) -> None:
    for box in boxes:
        if dims == 3:
            z0, y0, x0, z1, y1, x1 = box
            if depth is not None and not z0 <= depth < z1:
                continue
        else:
            y0, x0, y1, x1 = box
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color=color, lw=1.2))


def prediction_gallery(results: list[dict], mask_task: str, box_task: str | None = None,
                       score_threshold: float = 0.5) -> Figure:
    """Rows: image with true (green) and predicted (red) boxes; true mask; predicted mask.

    A volume is shown at the z slice where its true mask has the most foreground (else the middle).
    """
    n = len(results)
    fig = Figure(figsize=(2 * n, 6), layout="constrained")
    axes = fig.subplots(3, n, squeeze=False)
    for col, r in enumerate(results):
        dims = r["image"].ndim - 1
        depth = None
        if dims == 3:
            depth = _most_marked_slice(r["labels"].get(mask_task))
            depth = r["image"].shape[1] // 2 if depth is None else depth
        _show_image(axes[0, col], r["image"], depth)
        title = f"{r['domain'].modality}/{r['domain'].body_part} {dims}D" + (f", z={depth}" if dims == 3 else "")
        if box_task and box_task in r["predictions"]:
            true_boxes = np.asarray(r["labels"].get(box_task, np.zeros((0, 2 * dims))))
            _draw_boxes(axes[0, col], true_boxes, dims, depth, "lime")
            pred = r["predictions"][box_task]
            _draw_boxes(axes[0, col], pred["boxes"][pred["scores"] > score_threshold], dims, depth, "red")
        axes[0, col].set_title(title, fontsize=7)
        for row, mask in ((1, r["labels"].get(mask_task)), (2, r["predictions"].get(mask_task))):
            if mask is not None:
                axes[row, col].imshow(_middle_slice(np.asarray(mask), dims, depth), vmin=0, interpolation="nearest")
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_ylabel("image, boxes")
    axes[1, 0].set_ylabel(f"true {mask_task}")
    axes[2, 0].set_ylabel(f"predicted {mask_task}")
    return fig
