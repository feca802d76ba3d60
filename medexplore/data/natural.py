"""Natural photographs that ship with scikit-image, as a dataset for pretraining a *general* expert.

Offline stand-in for ImageNet/DINO weights: random crops of the package's photographs (people,
animals, objects, textures, astronomy), rescaled and flipped, never a medical image.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..models.tasks import Domain
from .sample import Sample

__all__ = ["NATURAL_IMAGES", "NaturalImages"]

NATURAL_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "horse",
                  "clock", "brick", "grass", "gravel", "hubble_deep_field", "colorwheel", "logo", "stereo_motorcycle")
DOMAIN = Domain("2d", "photo", "natural")


def _load(name: str) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]."""
    import skimage.data

    image = getattr(skimage.data, name)()
    image = image[0] if isinstance(image, tuple) else image
    image = np.asarray(image, dtype=np.float32)
    image = image / 255.0 if image.max() > 1.0 else image
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
    return image[..., :3]


class NaturalImages(Dataset):
    """``length`` random crops (side ``size``) of scikit-image's photographs, deterministic from ``seed``.

    Crops cover 10-60% of the photograph's shorter side, are resized to ``size`` and flipped at random;
    intensities are mapped to [-1, 1] like the 8-bit medical photographs (fundus, pathology).
    """

    def __init__(self, length: int = 4096, size: int = 28, seed: int = 0, names=NATURAL_IMAGES):
        if length < 1 or size < 4:
            raise UserError(f"NaturalImages: length must be >= 1 and size >= 4, got {length}, {size}")
        self.length, self.size, self.seed = length, size, seed
        self.photos = [torch.from_numpy(_load(n)).permute(2, 0, 1).contiguous() for n in names]
        self.names = tuple(names)
        self.tasks, self.domains = [], [DOMAIN]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> Sample:
        if not 0 <= k < self.length:
            raise IndexError(f"NaturalImages: index {k} out of range 0..{self.length - 1}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        p = int(torch.randint(len(self.photos), (1,), generator=g))
        photo = self.photos[p]
        h, w = photo.shape[1:]
        side = int(min(h, w) * (0.1 + 0.5 * torch.rand(1, generator=g).item()))
        y = int(torch.randint(h - side + 1, (1,), generator=g))
        x = int(torch.randint(w - side + 1, (1,), generator=g))
        crop = torch.nn.functional.interpolate(photo[None, :, y:y + side, x:x + side], size=(self.size, self.size),
                                               mode="bilinear", antialias=True, align_corners=False)[0]
        if torch.rand(1, generator=g).item() < 0.5:
            crop = crop.flip(-1)
        crop = crop * 2.0 - 1.0
        return Sample(crop, DOMAIN, {}, patient_id=self.names[p], meta={"source": f"natural:{self.names[p]}", "index": k})
