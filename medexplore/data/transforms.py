"""Intensity normalisation per modality and spatial fitting to patch multiples (2D and 3D)."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..models.tasks import Domain

__all__ = ["normalize_intensity", "robust_limits", "fit_to_multiple", "resize", "prepare_image", "RGB_MODALITIES"]

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
    x = x.clamp(*robust_limits(x))
    std = x.std()
    return (x - x.mean()) / std if std > 0 else x - x.mean()


def robust_limits(image: Tensor) -> tuple[float, float]:
    """The 0.5 / 99.5 percentiles of ``image`` (of a million evenly spaced values in a larger one): where
    :func:`normalize_intensity` clips an image that is neither CT nor a photograph."""
    flat = image.float().flatten()
    sample = flat if flat.numel() <= 1_000_000 else flat[torch.linspace(0, flat.numel() - 1, 1_000_000).long()]
    lo, hi = torch.quantile(sample, torch.tensor([0.005, 0.995]))
    return float(lo), float(hi)


def fit_to_multiple(image: Tensor, multiple: int, mode: str = "crop") -> Tensor:
    """Centre-crop (``crop``) or zero-pad at the far end (``pad``, so pixel coordinates and boxes stay
    valid) the spatial axes of ``(C, *spatial)`` to multiples of ``multiple``."""
    if mode not in ("crop", "pad"):
        raise UserError(f"fit_to_multiple: mode must be 'crop' or 'pad', got {mode!r}")
    spatial = image.shape[1:]
    if mode == "crop":
        target = [s - s % multiple for s in spatial]
        if min(target) == 0:
            raise UserError(f"image of spatial size {tuple(spatial)} is smaller than one {multiple}-pixel patch")
        starts = [(s - t) // 2 for s, t in zip(spatial, target)]
        return image[(slice(None), *[slice(a, a + t) for a, t in zip(starts, target)])]
    pads = []
    for s in reversed(spatial):
        extra = (-s) % multiple
        pads += [0, extra]
    return F.pad(image, pads)


def prepare_image(image, domain: Domain, normalize: bool = True, pad_to: int | Mapping[int, int] | None = None) -> Tensor:
    """An image as the model reads it: ``(C, *spatial)`` float checked against ``domain`` and for NaN/Inf,
    normalised as in training for its modality, and zero-padded to a multiple of ``pad_to`` (the patch
    size, or a model's ``config.patch_sizes``: one per number of spatial dimensions) when given.
    Inference and the napari widgets all prepare images here."""
    image = torch.as_tensor(np.asarray(image) if not isinstance(image, Tensor) else image).float()
    dims = 2 if domain.dimensionality == "2d" else 3
    if image.dim() != dims + 1:
        raise UserError(f"a {domain.dimensionality} image must have shape (C, {'H, W' if dims == 2 else 'D, H, W'}), "
                        f"got {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise UserError(f"image has {int((~torch.isfinite(image)).sum())} NaN/Inf values")
    if normalize:
        image = normalize_intensity(image, domain.modality)
    if isinstance(pad_to, Mapping):
        pad_to = pad_to[dims]
    return fit_to_multiple(image, pad_to, "pad") if pad_to else image


def resize(image: Tensor, size: tuple[int, ...], label: bool = False) -> Tensor:
    """Resize ``(C, *spatial)``: (bi/tri)linear for images, nearest for label maps."""
    mode = "nearest" if label else ("bilinear" if len(size) == 2 else "trilinear")
    kwargs = {} if label else {"align_corners": False}
    return F.interpolate(image[None].float(), size=tuple(size), mode=mode, **kwargs)[0]


class Augment:
    """Label-consistent training augmentation for ``(C, *spatial)`` images.

    Flips move segmentation masks and detection boxes with the image; random resized crops are
    applied only to samples without spatial annotations (masks, boxes), whose labels a crop
    would change; intensity jitter (contrast, brightness, Gaussian noise) leaves labels alone.
    The output keeps the input's shape. All randomness comes from the generator passed in.

    Args:
        flip_axes: spatial axes (0 = first spatial axis) that may be flipped; default: the last (left-right).
        flip_p, crop_p: probabilities of a flip (per axis) and of a crop.
        crop_scale: range of the crop's area/volume fraction.
        contrast, brightness, noise_std: intensity jitter ranges (in units of the image std for the last two).
    """

    def __init__(self, flip_axes: tuple[int, ...] | None = None, flip_p: float = 0.5, crop_p: float = 0.8,
                 crop_scale: tuple[float, float] = (0.7, 1.0), contrast: tuple[float, float] = (0.85, 1.15),
                 brightness: float = 0.1, noise_std: float = 0.02):
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise UserError(f"Augment.crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        self.flip_axes, self.flip_p, self.crop_p, self.crop_scale = flip_axes, flip_p, crop_p, crop_scale
        self.contrast, self.brightness, self.noise_std = contrast, brightness, noise_std

    def __call__(self, image: Tensor, labels: dict, spatial_kinds: dict[str, str], generator=None):
        """``spatial_kinds`` maps label names to ``"mask"`` or ``"boxes"``; other labels are image-level."""
        g = generator
        rand = lambda: float(torch.rand((), generator=g))  # noqa: E731
        dims = image.dim() - 1
        size = image.shape[1:]
        labels = dict(labels)
        has_spatial = any(labels.get(k) is not None for k in spatial_kinds)
        if not has_spatial and rand() < self.crop_p:
            frac = (self.crop_scale[0] + rand() * (self.crop_scale[1] - self.crop_scale[0])) ** (1 / dims)
            lengths = [max(1, round(s * frac)) for s in size]
            starts = [int(rand() * (s - n + 1)) for s, n in zip(size, lengths)]
            crop = image[(slice(None), *[slice(a, a + n) for a, n in zip(starts, lengths)])]
            image = resize(crop, tuple(size))
        axes = self.flip_axes if self.flip_axes is not None else (dims - 1,)
        for axis in axes:
            if rand() < self.flip_p:
                image = image.flip(axis + 1)
                for name, kind in spatial_kinds.items():
                    value = labels.get(name)
                    if value is None:
                        continue
                    if kind == "mask":
                        labels[name] = torch.as_tensor(value).flip(axis)
                    else:
                        boxes = torch.as_tensor(value, dtype=torch.float32).clone()
                        lo, hi = boxes[:, axis].clone(), boxes[:, axis + dims].clone()
                        boxes[:, axis], boxes[:, axis + dims] = size[axis] - hi, size[axis] - lo
                        labels[name] = boxes
        std = image.std().clamp(min=1e-6)
        image = image * (self.contrast[0] + rand() * (self.contrast[1] - self.contrast[0]))
        image = image + (2 * rand() - 1) * self.brightness * std
        if self.noise_std:
            image = image + torch.randn(image.shape, generator=g) * self.noise_std * std
        return image, labels
