"""Intensity normalisation per modality and spatial fitting to patch multiples (2D and 3D)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["normalize_intensity", "fit_to_multiple", "resize", "RGB_MODALITIES"]

RGB_MODALITIES = ("fundus", "pathology", "dermatoscopy", "microscopy")
CT_WINDOW = (-1000.0, 1000.0)


def normalize_intensity(image: Tensor, modality: str) -> Tensor:
    """Map raw intensities to roughly [-1, 1] by modality.

    CT: Hounsfield units clipped to [-1000, 1000] and scaled; 8-bit photographic modalities
    (fundus, pathology...): ``x / 127.5 - 1``; anything else (MRI, X-ray, ultrasound...): robust
    z-score, clipped at the 0.5 / 99.5 percentiles.
    """
    x = image.float()
    if modality == "ct":
        lo, hi = CT_WINDOW
        return (x.clamp(lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)
    if modality in RGB_MODALITIES and x.max() > 1.5:
        return x / 127.5 - 1.0
    flat = x.flatten()
    sample = flat if flat.numel() <= 1_000_000 else flat[torch.linspace(0, flat.numel() - 1, 1_000_000).long()]
    lo, hi = torch.quantile(sample, torch.tensor([0.005, 0.995]))
    x = x.clamp(lo, hi)
    std = x.std()
    return (x - x.mean()) / std if std > 0 else x - x.mean()


def fit_to_multiple(image: Tensor, multiple: int, mode: str = "crop") -> Tensor:
    """Centre-crop (``crop``) or zero-pad at the far end (``pad``, so pixel coordinates and boxes stay
    valid) the spatial axes of ``(C, *spatial)`` to multiples of ``multiple``."""
    if mode not in ("crop", "pad"):
        raise ValueError(f"fit_to_multiple: mode must be 'crop' or 'pad', got {mode!r}")
    spatial = image.shape[1:]
    if mode == "crop":
        target = [s - s % multiple for s in spatial]
        if min(target) == 0:
            raise ValueError(f"image of spatial size {tuple(spatial)} is smaller than one {multiple}-pixel patch")
        starts = [(s - t) // 2 for s, t in zip(spatial, target)]
        return image[(slice(None), *[slice(a, a + t) for a, t in zip(starts, target)])]
    pads = []
    for s in reversed(spatial):
        extra = (-s) % multiple
        pads += [0, extra]
    return F.pad(image, pads)


def resize(image: Tensor, size: tuple[int, ...], label: bool = False) -> Tensor:
    """Resize ``(C, *spatial)``: (bi/tri)linear for images, nearest for label maps."""
    mode = "nearest" if label else ("bilinear" if len(size) == 2 else "trilinear")
    kwargs = {} if label else {"align_corners": False}
    return F.interpolate(image[None].float(), size=tuple(size), mode=mode, **kwargs)[0]
