"""Overlapping sliding windows over a 2D or 3D image, with blending of the per-window outputs.

The scan is MONAI's (step ``window x (1 - overlap)``, the last window flush with the border) and so
are the blending modes (``constant``, ``gaussian`` with sigma = window / 8); with ``mode="constant"``
the result equals ``monai.inferers.sliding_window_inference``. It lives here because importing MONAI
costs more than the plugin's whole budget from Run to overlays (docs/measurements.md), and because
a window loop the caller drives can report progress and be cancelled between windows.
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import UserError

__all__ = ["window_starts", "WindowBlender"]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets along one axis; a window larger than the axis starts at 0 and is padded."""
    if size <= window:
        return [0]
    step = max(int(window * (1 - overlap)), 1)
    return sorted({min(i * step, size - window) for i in range(math.ceil((size - window) / step) + 1)})


def _importance(window: Sequence[int], mode: str) -> Tensor:
    if mode == "constant":
        return torch.ones(window)
    axes = [torch.exp(-0.5 * ((torch.arange(w) - w // 2) / (0.125 * w)) ** 2) for w in window]
    weights = axes[0]
    for axis in axes[1:]:
        weights = weights[..., None] * axis
    return weights.clamp_min(1e-3)


class WindowBlender:
    """Accumulates per-window outputs ``{name: (B, C, *window)}`` into image-size maps ``{name: (C, *size)}``.

    Example:
        >>> blender = WindowBlender((10,), (4,), 0.5, {"x": 1}, mode="constant")
        >>> blender.num_windows
        4
    """

    def __init__(self, size: Sequence[int], window: Sequence[int], overlap: float, channels: Mapping[str, int],
                 mode: str = "gaussian"):
        if len(size) != len(window) or any(w <= 0 for w in window):
            raise UserError(f"window {tuple(window)} does not fit an image of size {tuple(size)}")
        if not 0 <= overlap < 1:
            raise UserError(f"overlap must be in [0, 1), got {overlap}")
        if mode not in ("constant", "gaussian"):
            raise UserError(f"mode must be constant or gaussian, got {mode!r}")
        self.size, self.window = tuple(int(s) for s in size), tuple(int(w) for w in window)
        axes = [window_starts(s, w, overlap) for s, w in zip(self.size, self.window)]
        grids = torch.meshgrid(*[torch.tensor(a) for a in axes], indexing="ij")
        self.starts = [tuple(int(v) for v in p) for p in torch.stack([g.flatten() for g in grids], -1)]
        self.importance = _importance(self.window, mode)
        self.sums = {name: torch.zeros(c, *self.size) for name, c in channels.items()}
        self.weights = torch.zeros(self.size)

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    def region(self, start: Sequence[int]) -> tuple[slice, ...]:
        """The image region a window covers (clipped to the image)."""
        return tuple(slice(a, min(a + w, s)) for a, w, s in zip(start, self.window, self.size))

    def pad(self, windows: Tensor) -> Tensor:
        """Zero-pad ``(B, C, *region)`` crops at their far side to the full window."""
        missing = [w - r for w, r in zip(self.window, windows.shape[2:])]
        if not any(missing):
            return windows
        pads = [p for m in reversed(missing) for p in (0, m)]
        return torch.nn.functional.pad(windows, pads)

    def batches(self, batch_size: int) -> Iterator[tuple[int, list[tuple[int, ...]]]]:
        """``(windows done after this batch, starts of the batch)``."""
        for i in range(0, self.num_windows, batch_size):
            chunk = self.starts[i:i + batch_size]
            yield i + len(chunk), chunk

    def add(self, starts: Sequence[Sequence[int]], outputs: Mapping[str, Tensor]) -> None:
        for k, start in enumerate(starts):
            region = self.region(start)
            inside = tuple(slice(0, r.stop - r.start) for r in region)
            self.weights[region] += self.importance[inside]
            for name, value in outputs.items():
                self.sums[name][(slice(None), *region)] += value[k][(slice(None), *inside)].float() * self.importance[inside]

    def result(self) -> dict[str, Tensor]:
        if not bool((self.weights > 0).all()):
            raise RuntimeError("some pixels were not covered by any window (call add for every batch)")
        return {name: total / self.weights for name, total in self.sums.items()}
