"""Two random views of 2D and 3D images for self-supervised learning."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError

__all__ = ["ViewAugment", "TwoViews"]


@dataclass(frozen=True)
class ViewAugment:
    """Random resized crop, flips, intensity jitter, Gaussian blur and noise for ``(C, *spatial)`` images.

    The output has the input's shape, so patch divisibility is kept. Every random draw comes from the
    ``torch.Generator`` passed in, so views are reproducible from a seed.

    Args:
        crop_scale: range of the crop's volume fraction.
        flip_p: probability of flipping each spatial axis.
        brightness, contrast: additive (in units of the image std) and multiplicative jitter ranges.
        blur_p, blur_sigma: probability and sigma range (in pixels) of Gaussian blur.
        noise_p, noise_std: probability and std (in units of the image std) of Gaussian noise.
    """

    crop_scale: tuple[float, float] = (0.35, 1.0)
    flip_p: float = 0.5
    brightness: float = 0.2
    contrast: tuple[float, float] = (0.8, 1.2)
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    noise_p: float = 0.5
    noise_std: float = 0.05

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"ViewAugment.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("flip_p", "blur_p", "noise_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"ViewAugment.{name} must be a probability, got {getattr(self, name)}")

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if image.dim() not in (3, 4):
            raise UserError(f"ViewAugment: expected (C, H, W) or (C, D, H, W), got shape {tuple(image.shape)}")
        g = generator
        rand = lambda: float(torch.rand((), generator=g))  # noqa: E731
        x = self._crop(image.float(), rand)
        for axis in range(1, x.dim()):
            if rand() < self.flip_p:
                x = x.flip(axis)
        std = x.std().clamp(min=1e-6)
        x = x * (self.contrast[0] + rand() * (self.contrast[1] - self.contrast[0]))
        x = x + (2 * rand() - 1) * self.brightness * std
        if rand() < self.blur_p:
            x = gaussian_blur(x, self.blur_sigma[0] + rand() * (self.blur_sigma[1] - self.blur_sigma[0]))
        if rand() < self.noise_p:
            x = x + torch.randn(x.shape, generator=g) * self.noise_std * std
        return x

    def _crop(self, x: Tensor, rand) -> Tensor:
        size = x.shape[1:]
        frac = (self.crop_scale[0] + rand() * (self.crop_scale[1] - self.crop_scale[0])) ** (1 / len(size))
        starts, lengths = [], []
        for s in size:
            length = max(1, min(s, round(s * frac * (0.8 + 0.4 * rand()))))
            starts.append(int(rand() * (s - length + 1)))
            lengths.append(length)
        crop = x[(slice(None), *[slice(a, a + n) for a, n in zip(starts, lengths)])]
        mode = "bilinear" if len(size) == 2 else "trilinear"
        return F.interpolate(crop[None], size=tuple(size), mode=mode, align_corners=False)[0]


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a (C, *spatial) image over its spatial axes (reflect padding)."""
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = x
    for axis in range(1, x.dim()):
        moved = out.movedim(axis, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        if shape[-1] > radius:
            flat = F.pad(flat, (radius, radius), mode="reflect")
        else:
            flat = F.pad(flat, (radius, radius), mode="replicate")
        flat = F.conv1d(flat, kernel.view(1, 1, -1))
        out = flat.reshape(shape).movedim(-1, axis)
    return out


class TwoViews:
    """Callable returning two independent augmented views of one image."""

    def __init__(self, augment: ViewAugment | None = None):
        self.augment = augment or ViewAugment()

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.augment(image, generator), self.augment(image, generator)
