"""Transformer blocks over a packed token sequence, with timm's parameter names and shapes."""
from __future__ import annotations

import torch
from timm.layers import LayerScale, Mlp
from torch import Tensor, nn

from ..errors import UserError
from .packing import TokenLayout
from .rope import rotate_qkv

__all__ = ["Attention", "Block"]


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` and ``proj`` match ``timm.models.vision_transformer.Attention``.

    Adapters and LoRA wrap ``qkv``/``proj`` (plain ``nn.Linear``) without touching this class.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"Attention: dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, layout: TokenLayout, rope=None, need_weights: bool = False):
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        if rope is not None:  # queries and keys rotated in one pass, values passed through
            qkv = rotate_qkv(qkv, *rope)
        q, k, v = qkv.unbind(1)
        out, weights = layout.self_attention(q, k, v, need_weights)
        return self.proj(out.flatten(1)), weights


class Block(nn.Module):
    """Pre-norm block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))`` (timm ``Block`` names).

    ``layer_scale`` (timm's ``init_values``): a learnable per-channel scale on each residual branch,
    starting at that value (None: no scale, ``ls1``/``ls2`` are identities).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x: Tensor, layout: TokenLayout, rope=None, need_weights: bool = False):
        attn_out, weights = self.attn(self.norm1(x), layout, rope, need_weights)
        x = x + self._drop_samples(self.ls1(attn_out), layout)
        x = x + self._drop_samples(self.ls2(self.mlp(self.norm2(x))), layout)
        return x, weights

    def _drop_samples(self, residual: Tensor, layout: TokenLayout) -> Tensor:
        """Stochastic depth per *sample* (not per token) of the packed sequence."""
        if not self.training or self.drop_path == 0.0:
            return residual
        keep = 1.0 - self.drop_path
        scale = torch.bernoulli(residual.new_full((layout.num_samples,), keep)) / keep
        return residual * scale[layout.sample_idx.clamp(min=0)][:, None]
