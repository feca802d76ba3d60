"""3D rotary position embeddings computed from integer (z, y, x) token coordinates."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UserError

__all__ = ["Rotary3D", "rotate_qkv"]


class Rotary3D(nn.Module):
    """Rotary embedding over three axes.

    The ``head_dim / 2`` rotation pairs are split evenly between z, y and x (leftover pairs stay
    unrotated); pair ``j`` of an axis turns by ``coord * theta ** (-j / pairs_per_axis)``. Because
    only coordinate differences enter ``q . k``, shifting every coordinate of a sample leaves its
    attention unchanged, and one model serves every image size and both dimensionalities.

    The tables come laid out like a fused ``qkv`` projection, ``(T, 3, 1, head_dim)``, so that
    :func:`rotate_qkv` turns queries and keys (and leaves values) in one pass.

    Example:
        >>> rope = Rotary3D(head_dim=64)
        >>> cos, sin = rope(torch.zeros(5, 3, dtype=torch.long))
        >>> cos.shape
        torch.Size([5, 3, 1, 64])
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
        """``cos`` and signed ``sin`` tables of shape (T, 3, 1, head_dim) for (T, 3) coordinates.

        Slots 0 and 1 (queries, keys) hold the rotation; slot 2 (values) is the identity (cos 1,
        sin 0), as are prefix tokens. ``sin`` carries the sign of the rotate-half pairing:
        ``-sin`` on the first half of the head, ``+sin`` on the second.
        """
        angles = coords.to(self.freqs.dtype) @ self.freqs  # (T, pairs)
        if is_prefix is not None:
            angles = angles.masked_fill(is_prefix[:, None], 0.0)
        cos, sin = angles.cos(), angles.sin()
        qk_cos, qk_sin = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)
        cos3 = torch.stack([qk_cos, qk_cos, torch.ones_like(qk_cos)], 1)
        sin3 = torch.stack([qk_sin, qk_sin, torch.zeros_like(qk_sin)], 1)
        return cos3[:, :, None], sin3[:, :, None]


class _RotateQKV(torch.autograd.Function):
    """``x * cos + roll(x, half) * sin``; its gradient is the same rotation with ``-sin`` (the inverse),
    so backward is one fused pass and keeps only the small tables."""

    generate_vmap_rule = True  # per-sample gradients (torch.func) go through it too

    @staticmethod
    def forward(qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return torch.addcmul(qkv * cos, qkv.roll(qkv.shape[-1] // 2, -1), sin)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, cos, sin = inputs
        ctx.save_for_backward(cos, sin)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return torch.addcmul(grad * cos, grad.roll(grad.shape[-1] // 2, -1), sin, value=-1.0), None, None


def rotate_qkv(qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the queries and keys of a fused (T, 3, H, head_dim) ``qkv`` by :class:`Rotary3D`'s tables
    (rotate-half pairing); values pass unchanged."""
    if qkv.dim() != 4 or qkv.shape[1] != 3 or cos.shape[-1] != qkv.shape[-1]:
        raise UserError(f"rotate_qkv: expected qkv (T, 3, H, {cos.shape[-1]}), got {tuple(qkv.shape)}")
    return _RotateQKV.apply(qkv, cos.to(qkv.dtype), sin.to(qkv.dtype))
