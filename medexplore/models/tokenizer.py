"""Patch tokenizer for 2D and 3D images (a linear patch embedding or a convolutional stem), with
optional learned absolute positions."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

__all__ = ["PatchEmbed", "ConvStem", "LearnedPositions", "STEMS", "STEM_NORMS"]

STEMS = ("patch", "conv")
STEM_NORMS = ("group", "instance", "batch")


def _stem_norm(norm: str, dims: int, width: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(math.gcd(8, width), width)
    if norm == "instance":
        return nn.GroupNorm(width, width)
    return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(width)


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al., "Early convolutions help transformers see better", 2021) for one
    dimensionality: ``log2(patch)`` stride-2 3x3 (3x3x3) convolutions, each with a normalisation and GELU,
    widths rising to ``embed_dim / 2``, then a 1x1 projection to ``embed_dim``. It gives the token grid of a
    patch embedding of the same patch size, with the inductive bias of a small CNN in front.

    ``norm``: ``group`` (GroupNorm, 8 groups), ``instance`` (GroupNorm with one channel per group: every
    channel of every image centred and scaled on its own) or ``batch`` (BatchNorm, as in the paper). In a
    sparse image (a 3D mask: 98% background) 8 groups leave every channel an offset that is the same at
    every background voxel, so the tokens differ mostly by one common vector and collapse to it within
    a few optimizer steps (``benchmarks/early_steps.py``); per-channel centring takes the background to
    about zero. BatchNorm centres per channel too, but its running averages mix every domain of a
    multi-domain model, so evaluation normalises an X-ray with statistics partly from fundus photographs.

    Example:
        >>> ConvStem(2, 3, 64, 4)(torch.randn(2, 3, 28, 28)).shape
        torch.Size([2, 64, 7, 7])
    """

    def __init__(self, dims: int, in_chans: int, embed_dim: int, patch_size: int, norm: str = "group"):
        super().__init__()
        if norm not in STEM_NORMS:
            raise UserError(f"stem norm must be one of {STEM_NORMS}, got {norm!r}")
        stages = int(round(math.log2(patch_size)))
        if 2 ** stages != patch_size or stages < 1:
            raise UserError(f"stem 'conv' needs a patch size that is a power of 2 (>= 2), got {patch_size}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        widths = [max(8, embed_dim // 2 ** (stages - i)) for i in range(stages)]  # e.g. D/4, D/2 for patch 4
        self.in_chans = in_chans
        layers: list[nn.Module] = []
        cin = in_chans
        for width in widths:
            layers += [conv(cin, width, 3, stride=2, padding=1, bias=False), _stem_norm(norm, dims, width), nn.GELU()]
            cin = width
        self.convs = nn.Sequential(*layers)
        self.proj = conv(cin, embed_dim, 1)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, C, *spatial)`` -> ``(B, embed_dim, *spatial / patch)``; grey images use the channel-summed
        first kernel (the same as replicating grey into every channel)."""
        first, rest = self.convs[0], self.convs[1:]
        weight = first.weight
        if images.shape[1] == 1 and self.in_chans != 1:
            weight = weight.sum(1, keepdim=True)
        conv = F.conv2d if images.dim() == 4 else F.conv3d
        x = conv(images, weight, None, first.stride, first.padding)
        return self.proj(rest(x))


class PatchEmbed(nn.Module):
    """Tokens of 2D ``(B, C, H, W)`` and 3D ``(B, C, D, H, W)`` images, one per ``patch_size`` patch.

    ``stem="patch"`` (the default, timm-compatible): a linear embedding of non-overlapping patches;
    ``proj`` is a ``Conv2d`` (timm's ``patch_embed.proj``), ``proj_3d`` a ``Conv3d``, both run as one
    matmul over unfolded patches. ``stem="conv"``: a :class:`ConvStem` per dimensionality
    (``stem_2d``, ``stem_3d``), normalised by ``stem_norm``. A single-channel image uses the channel-summed
    kernel, which is the same as replicating grey into every channel.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, stem: str = "patch",
                 patch_size_3d: int | None = None, stem_norm: str = "group"):
        super().__init__()
        if stem not in STEMS:
            raise UserError(f"stem must be one of {STEMS}, got {stem!r}")
        self.patch_sizes = {2: patch_size, 3: patch_size_3d or patch_size}
        self.in_chans = in_chans
        self.stem, self.stem_norm = stem, stem_norm
        p2, p3 = self.patch_sizes[2], self.patch_sizes[3]
        if stem == "patch":
            self.proj = nn.Conv2d(in_chans, embed_dim, p2, p2)
            self.proj_3d = nn.Conv3d(in_chans, embed_dim, p3, p3)
        else:
            self.stem_2d = ConvStem(2, in_chans, embed_dim, p2, stem_norm)
            self.stem_3d = ConvStem(3, in_chans, embed_dim, p3, stem_norm)

    def grid(self, shape: tuple[int, ...], where: str = "image") -> tuple[int, ...]:
        """Token grid of a ``(C, *spatial)`` image, with a ValueError for unsupported shapes."""
        channels, spatial = shape[0], tuple(shape[1:])
        if len(spatial) not in (2, 3):
            raise UserError(f"{where}: expected (C, H, W) or (C, D, H, W), got shape {tuple(shape)}")
        if channels not in (1, self.in_chans):
            raise UserError(f"{where}: shape {tuple(shape)} has {channels} channels; this model takes "
                             f"{self.in_chans} (or 1, treated as grey)")
        p = self.patch_sizes[len(spatial)]
        if any(s % p or s == 0 for s in spatial):
            raise UserError(f"{where}: spatial size {spatial} is not divisible by the {len(spatial)}D patch size "
                             f"{p}; crop or resize to a multiple of {p}")
        grid = tuple(s // p for s in spatial)
        if self.stem == "conv" and self.stem_norm == "instance" and all(g == 1 for g in grid):
            raise UserError(f"{where}: spatial size {spatial} is one {len(spatial)}D patch; stem_norm 'instance' "
                             f"needs images larger than one patch ({p} px) to normalise over")
        return grid

    def patches(self, images: Tensor) -> Tensor:
        """(B, n, C * p^dims) flattened patches in row-major (z, y, x) order."""
        dims = images.dim() - 2
        p = self.patch_sizes[dims]
        b, c = images.shape[:2]
        grid = [s // p for s in images.shape[2:]]
        # (B, C, g0, p, g1, p[, g2, p]) -> (B, g0, g1[, g2], C, p, p[, p])
        x = images.reshape(b, c, *[v for g in grid for v in (g, p)])
        perm = [0] + [2 + 2 * i for i in range(dims)] + [1] + [3 + 2 * i for i in range(dims)]
        return x.permute(perm).reshape(b, -1, c * p ** dims)

    def project(self, patches: Tensor, channels: int, dims: int) -> Tensor:
        """Embed ``patches`` (..., C * p^dims) of ``channels``-channel, ``dims``-D images."""
        conv = self.proj if dims == 2 else self.proj_3d
        weight = conv.weight
        if channels == 1 and self.in_chans != 1:
            weight = weight.sum(1, keepdim=True)
        return F.linear(patches, weight.reshape(weight.shape[0], -1), conv.bias)

    def embed(self, groups: Sequence[Tensor]) -> Tensor:
        """``(sum of B_g * n_g, D)`` tokens of image groups of one dimensionality and channel count, group
        after group, each in row-major (z, y, x) order (one matmul for all groups with the patch stem)."""
        channels, dims = groups[0].shape[1], groups[0].dim() - 2
        if self.stem == "patch":
            pieces = [self.patches(images).flatten(0, 1) for images in groups]
            return self.project(pieces[0] if len(pieces) == 1 else torch.cat(pieces), channels, dims)
        stem = self.stem_2d if dims == 2 else self.stem_3d
        pieces = [stem(images).flatten(2).transpose(1, 2).flatten(0, 1) for images in groups]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def forward(self, images: Tensor) -> Tensor:
        """(B, n, D) tokens in row-major (z, y, x) order."""
        return self.embed([images]).unflatten(0, (images.shape[0], -1))


class LearnedPositions(nn.Module):
    """Absolute position table over a (z, y, x) grid, indexed by token coordinates.

    ``pos_embed`` has timm's shape ``(1, prefix + Gz*Gy*Gx, D)``: with ``Gz = 1`` a timm ViT's
    ``pos_embed`` loads unchanged.
    """

    def __init__(self, grid: tuple[int, int, int], num_prefix: int, embed_dim: int):
        super().__init__()
        self.grid = tuple(grid)
        self.num_prefix = num_prefix
        self.pos_embed = nn.Parameter(torch.randn(1, num_prefix + grid[0] * grid[1] * grid[2], embed_dim) * 0.02)

    def forward(self, coords: Tensor, is_prefix: Tensor) -> Tensor:
        """(T, D) position embeddings; prefix tokens take the prefix rows."""
        gz, gy, gx = self.grid
        limits = torch.tensor(self.grid, device=coords.device)
        if (coords >= limits).any():
            worst = coords.amax(0).tolist()
            raise UserError(f"token grid up to (z, y, x) = {tuple(v + 1 for v in worst)} exceeds the learned "
                             f"position grid {self.grid}; use pos_embed='rope' or a larger pos_grid")
        index = self.num_prefix + (coords[:, 0] * gy + coords[:, 1]) * gx + coords[:, 2]
        index = torch.where(is_prefix, 0, index)  # the class token (at most one prefix token)
        return self.pos_embed[0, index]
