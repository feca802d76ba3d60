"""Multi-scale decoder from transformer token maps to full-resolution pixel embeddings (2D or 3D)."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .layout import channels_last, concat_channels

__all__ = ["MultiScaleDecoder", "feature_depths"]


def feature_depths(depth: int, patch_size: int) -> tuple[int, ...]:
    """Block indices whose outputs feed the decoder: ``log2(patch) + 1`` of them, evenly spread."""
    levels = int(math.log2(patch_size)) + 1
    return tuple(sorted({max(0, round(depth * (i + 1) / levels) - 1) for i in range(levels)}))


def _conv_block(dims: int, cin: int, cout: int) -> nn.Sequential:
    """3x3 convolution, group norm (up to 8 groups of at least 2 channels), GELU. A group of one channel would
    normalise each channel on its own over the window, which erases what a nearly flat window (air) holds."""
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(conv(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, max(1, cout // 2)), cout),
                         nn.GELU())


class MultiScaleDecoder(nn.Module):
    """UNETR-style decoder for one spatial dimensionality.

    The deepest token map is upsampled by 2 ``log2(patch)`` times; at each step it is fused with a
    shallower token map (projected, then resized) and at full resolution with a convolutional stem
    of the image itself. Returns ``(B, out_channels, *image_size)``. The full-resolution stage (the image
    stem, the last fusion and the head) is ``full_channels`` wide (default ``channels``): it holds most of
    the decoder's cost, which a narrower stage cuts while the coarser levels keep their width.
    """

    def __init__(self, dims: int, embed_dim: int, in_chans: int, patch_size: int, channels: int,
                 num_features: int, out_channels: int, full_channels: int | None = None):
        super().__init__()
        if patch_size & (patch_size - 1):
            raise UserError(f"segmentation needs a power-of-two patch size, got {patch_size}")
        self.dims, self.in_chans = dims, in_chans
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        up = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        levels = int(math.log2(patch_size))
        self.bottleneck = conv(embed_dim, channels, 1)
        self.skips = nn.ModuleList(conv(embed_dim, channels, 1) for _ in range(max(1, num_features - 1)))
        self.ups = nn.ModuleList(up(channels, channels, 2, stride=2) for _ in range(levels))
        full = channels if full_channels is None else full_channels
        self.fuse = nn.ModuleList(_conv_block(dims, 2 * channels, full if level == levels - 1 else channels)
                                  for level in range(levels))
        self.stem = _conv_block(dims, in_chans, full)
        decoded = full if levels else channels  # the width of the token path at full resolution
        self.head = nn.Sequential(_conv_block(dims, decoded + full, full), conv(full, out_channels, 1))

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        """``features``: shallow-to-deep ``(B, D, *grid)`` token maps; ``image``: ``(B, C, *size)``."""
        # channels-last throughout (:mod:`.layout`): 1x1 convolutions, small volumes and grey images come out
        # in the default layout, so what each 3x3 convolution reads is put back in it
        x = self.bottleneck(features[-1])
        skips = list(reversed(features[:-1])) or features[-1:]  # deep to shallow; reused when few
        for level, (up, fuse) in enumerate(zip(self.ups, self.fuse)):
            x = up(x)
            k = min(level, len(skips) - 1)
            skip = F.interpolate(self.skips[k](skips[k]), size=x.shape[2:], mode="nearest")
            x = fuse(concat_channels([x, skip]))
        stem_conv = self.stem[0]
        weight = stem_conv.weight
        if image.shape[1] == 1 and self.in_chans != 1:
            weight = weight.sum(1, keepdim=True)
        conv = F.conv2d if self.dims == 2 else F.conv3d
        stem = self.stem[2](self.stem[1](conv(channels_last(image), weight, padding=1)))
        return self.head(concat_channels([x, stem]))
