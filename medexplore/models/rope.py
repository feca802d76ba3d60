"""3D rotary position embeddings computed from integer (z, y, x) token coordinates."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UserError

__all__ = ["Rotary3D", "apply_rotary"]


class Rotary3D(nn.Module):
    """Rotary embedding over three axes.

    The ``head_dim / 2`` rotation pairs are split evenly between z, y and x (leftover pairs stay
    unrotated); pair ``j`` of an axis turns by ``coord * theta ** (-j / pairs_per_axis)``. Because
    only coordinate differences enter ``q . k``, shifting every coordinate of a sample leaves its
    attention unchanged, and one model serves every image size and both dimensionalities.

    Example:
        >>> rope = Rotary3D(head_dim=64)
        >>> cos, sin = rope(torch.zeros(5, 3, dtype=torch.long))
        >>> cos.shape
        torch.Size([5, 1, 64])
    """

    def __init__(self, head_dim: int, theta: float = 100.0):
        super().__init__()
        if head_dim % 2 or head_dim < 6:
            raise UserError(f"Rotary3D: head_dim must be even and >= 6, got {head_dim}")
        pairs = head_dim // 2
        per_axis = pairs // 3
        freqs = theta ** (-torch.arange(per_axis, dtype=torch.float64) / per_axis)
        table = torch.zeros(3, pairs, dtype=torch.float64)  # frequency of each pair along each axis
        for axis in range(3):
            table[axis, axis * per_axis:(axis + 1) * per_axis] = freqs
        self.register_buffer("freqs", table.float(), persistent=False)

    def forward(self, coords: Tensor, is_prefix: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cos and sin of shape (T, 1, head_dim) for (T, 3) coordinates; prefix tokens get identity."""
        angles = coords.to(self.freqs.dtype) @ self.freqs  # (T, pairs)
        if is_prefix is not None:
            angles = angles.masked_fill(is_prefix[:, None], 0.0)
        angles = torch.cat([angles, angles], -1)[:, None, :]
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (T, H, head_dim) ``x`` by the angles behind ``cos``/``sin`` (rotate-half pairing)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], -1) * sin
