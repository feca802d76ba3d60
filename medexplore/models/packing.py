"""Packed batches: many 2D/3D samples of any size in one token sequence.

Samples whose images share a shape form a *group*. Groups with the same token count share one
*segment*, a contiguous ``(rows, n, D)`` stretch of the packed sequence; groups of nearby token counts
share one too, padded to its longest with masked keys while the padding stays small. Attention runs
as dense batched attention within each segment, which keeps its cost near sum(n_i^2), issues one
call per segment rather than per shape, and never lets a token see another sample.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .tasks import Domain

__all__ = ["Batch", "TokenLayout", "Segment", "Group", "PACKING_MODES"]

PACKING_MODES = ("grouped", "padded")
MAX_PADDING = 0.5  # padded attention slots allowed per real token when nearby token counts share a segment


@dataclass
class Batch:
    """The model's input: images grouped by shape, each sample's domain, and optional targets.

    Args:
        groups: image tensors ``(B_g, C, H, W)`` or ``(B_g, C, D, H, W)``, one per shape.
        group_samples: for each group, the (batch-order) sample index of each of its rows.
        domains: one :class:`Domain` per sample, in batch order.
        targets: per task name, one label per sample (``None`` where the sample lacks it).
        meta: free per-batch information (patient ids, file names...), carried untouched.

    Build one with :meth:`from_images`.
    """

    groups: list[Tensor]
    group_samples: list[Tensor]
    domains: list[Domain]
    targets: dict[str, list] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_images(cls, images: Sequence[Tensor] | Tensor, domains: Sequence[Domain] | Domain,
                    targets: dict[str, Sequence] | None = None, meta: dict | None = None) -> "Batch":
        """Group a list of ``(C, H, W)`` / ``(C, D, H, W)`` images (or one stacked tensor) by shape.

        Example:
            >>> b = Batch.from_images([torch.zeros(1, 28, 28), torch.zeros(1, 28, 28, 28)],
            ...                       [Domain("2d"), Domain("3d")])
            >>> [tuple(g.shape) for g in b.groups]
            [(1, 1, 28, 28), (1, 1, 28, 28, 28)]
        """
        if isinstance(images, Tensor):
            images = list(images.unbind(0))
        if isinstance(domains, Domain):
            domains = [domains] * len(images)
        if len(images) == 0:
            raise UserError("Batch.from_images: no images given")
        if len(domains) != len(images):
            raise UserError(f"Batch.from_images: {len(images)} images but {len(domains)} domains")
        by_shape: dict[tuple, list[int]] = {}
        for i, (img, dom) in enumerate(zip(images, domains)):
            if not isinstance(img, Tensor) or img.dim() not in (3, 4):
                shape = tuple(getattr(img, "shape", ()))
                raise UserError(f"image {i}: expected a (C, H, W) or (C, D, H, W) tensor, got shape {shape}")
            if img.dim() - 1 != dom.dims:
                raise UserError(f"image {i}: shape {tuple(img.shape)} is {img.dim() - 1}D but its domain says {dom.dimensionality}")
            by_shape.setdefault(tuple(img.shape), []).append(i)
        groups = [torch.stack([images[i] for i in idx]) for idx in by_shape.values()]
        group_samples = [torch.tensor(idx, dtype=torch.long) for idx in by_shape.values()]
        targets = {k: list(v) for k, v in (targets or {}).items()}
        for name, labels in targets.items():
            if len(labels) != len(images):
                raise UserError(f"targets[{name!r}]: {len(labels)} labels for {len(images)} images")
        return cls(groups, group_samples, list(domains), targets, dict(meta or {}))

    @property
    def num_samples(self) -> int:
        return len(self.domains)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking) if isinstance(t, Tensor) else t  # noqa: E731
        return Batch([move(g) for g in self.groups], [move(s) for s in self.group_samples], self.domains,
                     {k: [move(t) for t in v] for k, v in self.targets.items()}, self.meta)


@dataclass
class Segment:
    """A stretch of the packed sequence viewed as ``(batch, length)``; attention stays inside rows."""

    start: int
    batch: int
    length: int
    sample_ids: Tensor  # (batch,) sample index of each row
    key_mask: Tensor | None = None  # (batch, length) True where a real token sits
    gather: Tensor | None = None  # compact rows: (batch, length) index of each slot within the segment
    num_real: int = 0  # compact rows: real tokens, all the segment holds

    @property
    def size(self) -> int:
        """Tokens the segment holds in the packed sequence."""
        return self.batch * self.length if self.gather is None else self.num_real

    @property
    def stop(self) -> int:
        return self.start + self.size

    def rows(self, x: Tensor) -> Tensor:
        """The segment's tokens of ``x`` (T, ...) as (batch, length, ...) rows (a view unless compact)."""
        # a slice's backward fills a zero tensor of all of ``x``, even when it spans all of it
        whole = self.start == 0 and self.stop == len(x)
        return self.as_rows(x if whole else x[self.start:self.stop])

    def as_rows(self, piece: Tensor) -> Tensor:
        """The segment's own ``piece`` (size, ...) of the sequence as (batch, length, ...) rows.

        Compact rows are gathered (padding slots repeat a real token; attention masks them as keys).
        """
        if self.gather is None:
            return piece.unflatten(0, (self.batch, self.length))
        # index_select: its backward is one index_add, where advanced indexing's accumulates with a sort
        return piece.index_select(0, self.gather.flatten()).unflatten(0, (self.batch, self.length))

    def from_rows(self, rows: Tensor) -> Tensor:
        """(batch, length, ...) rows back to the segment's (size, ...) tokens."""
        return rows.flatten(0, 1) if self.gather is None else rows.flatten(0, 1).index_select(0, self.real_slots)

    @functools.cached_property
    def real_slots(self) -> Tensor:
        """Flat (batch * length) indices of the real tokens' slots of a compact segment, in packed order."""
        return self.key_mask.flatten().nonzero().squeeze(1)


@dataclass
class Group:
    """Where one same-shape image group lives: its segment, first row, token grid and packed stretch."""

    segment: int
    row0: int
    sample_ids: Tensor
    grid: tuple[int, ...]  # (gh, gw) or (gd, gh, gw)
    image_shape: tuple[int, ...]  # spatial shape of the images
    start: int = 0  # packed position of the group's first token
    row_length: int = 0  # packed tokens per row (prefix, patches and, in padded mode, padding)

    @property
    def num_tokens(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


@dataclass
class TokenLayout:
    """Everything about the packed sequence except the token features themselves."""

    segments: list[Segment]
    groups: list[Group]
    sample_idx: Tensor  # (T,) sample of each token, -1 for padding (``padded`` mode)
    coords: Tensor  # (T, 3) integer (z, y, x) grid coordinates
    is_prefix: Tensor  # (T,) class tokens
    num_samples: int
    num_prefix: int

    @property
    def num_tokens(self) -> int:
        return self.sample_idx.numel()

    def packed_group_order(self) -> list[int]:
        """Group indices in the order their rows sit in the packed sequence."""
        return sorted(range(len(self.groups)), key=lambda g: (self.groups[g].segment, self.groups[g].row0))

    def patch_positions(self, groups: Sequence[int]) -> Tensor:
        """Packed positions of the patch tokens of ``groups``, in packed order (row by row)."""
        selected = torch.zeros(self.num_samples + 1, dtype=torch.bool, device=self.sample_idx.device)
        selected[torch.cat([self.groups[g].sample_ids for g in groups])] = True
        return torch.nonzero(self.is_patch & selected[self.sample_idx]).flatten()  # padding reads [-1]: False

    @functools.cached_property
    def first_positions(self) -> Tensor:
        """(S,) packed position of each sample's first token (its class token, if any), in batch order."""
        out = torch.empty(self.num_samples, dtype=torch.long, device=self.sample_idx.device)
        for group in self.groups:
            out[group.sample_ids] = group.start + torch.arange(len(group.sample_ids), device=out.device) * group.row_length
        return out

    @functools.cached_property
    def unit_coords(self) -> Tensor:
        """(T, 3) each token's centre as a fraction of its image's (z, y, x) extent, in (0, 1); prefix
        tokens 0. Rotary positions leave tokens without absolute positions; heads that must say
        *where* (boxes) read these."""
        extents = torch.ones(self.num_samples, 3, device=self.sample_idx.device)
        for group in self.groups:
            grid = (1,) * (3 - len(group.grid)) + tuple(group.grid)
            extents[group.sample_ids] = torch.tensor(grid, dtype=extents.dtype, device=extents.device)
        unit = (self.coords + 0.5) / extents[self.sample_idx.clamp(min=0)]
        return unit.masked_fill(self.is_prefix[:, None], 0.0)

    @functools.cached_property
    def is_patch(self) -> Tensor:
        """(T,) True where a sample's patch token sits (not prefix, not padding)."""
        return (self.sample_idx >= 0) & ~self.is_prefix

    @functools.cached_property
    def positions_in_row(self) -> Tensor:
        """(T,) position of each token within its sample's row (0 = first prefix token)."""
        return torch.cat([seg.from_rows(torch.arange(seg.length, device=self.sample_idx.device).expand(seg.batch, -1))
                          for seg in self.segments])

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, grids: Sequence[tuple[int, ...]], group_samples: Sequence[Tensor], image_shapes,
              num_samples: int, num_prefix: int = 0, mode: str = "grouped", device=None,
              max_padding: float = MAX_PADDING) -> "TokenLayout":
        """Lay out groups of ``len(group_samples[g])`` samples with token grid ``grids[g]``.

        ``grouped``: groups of equal token count share one attention segment; groups of nearby counts
        share one too, while the padding stays within ``max_padding`` of the real tokens (so a batch of
        all-different small images does not pay one call per image). Such a segment is *compact*: the
        packed sequence holds only real tokens, which attention gathers into padded rows with masked
        keys, so the per-token layers never see padding.
        ``padded``: one segment for the whole batch, padding stored in the sequence (the reference path).
        """
        if mode not in PACKING_MODES:
            raise UserError(f"packing mode must be one of {PACKING_MODES}, got {mode!r}")
        lengths = [num_prefix + _prod(g) for g in grids]
        sizes = [len(ids) for ids in group_samples]
        buckets = ([list(range(len(grids)))] if mode == "padded"
                   else _buckets_by_length(lengths, sizes, max_padding))
        # Each bucket of groups becomes one attention segment of rows of ``n`` slots (its longest row).
        # Within it the groups' rows are laid one after another: ``row`` counts rows, ``offset`` counts
        # positions in the packed sequence (a compact segment stores each row at its own length, a
        # padded one at ``n``). Per-token metadata (sample id, (z, y, x), prefix flag) is built once per
        # segment over all its rows, then the padding slots are dropped for compact segments; ``gather``
        # maps each of the ``n`` slots of a row back to a real token for attention.
        segments, sample_idx, coords, prefix = [], [], [], []
        groups: list[Group | None] = [None] * len(grids)
        start = 0  # where the current segment starts in the packed sequence
        for bucket in buckets:
            n = max(lengths[g] for g in bucket)
            padded = any(lengths[g] != n for g in bucket)
            compact = padded and mode == "grouped"
            row, offset = 0, start
            for g in bucket:
                row_length = lengths[g] if compact else n
                groups[g] = Group(len(segments), row, group_samples[g].to(device), tuple(grids[g]),
                                  tuple(image_shapes[g]), offset, row_length)
                row, offset = row + sizes[g], offset + sizes[g] * row_length
            ids_all = torch.cat([groups[g].sample_ids for g in bucket])
            rows_grid = torch.tensor([(1,) * (3 - len(grids[g])) + tuple(grids[g]) for g in bucket], device=device)
            rows_grid = rows_grid.repeat_interleave(torch.tensor([sizes[g] for g in bucket], device=device), 0)
            seg_idx, seg_coords, seg_prefix, valid = _segment_tokens(rows_grid, ids_all, n, num_prefix)
            gather = None
            if compact:  # slot -> index among the segment's real tokens (padding slots repeat the row's last)
                gather = (valid.flatten().cumsum(0) - 1).view_as(valid)
                seg_idx, seg_coords, seg_prefix = seg_idx[valid], seg_coords[valid], seg_prefix[valid]
            segments.append(Segment(start, len(ids_all), n, ids_all, valid if padded else None, gather, offset - start))
            sample_idx.append(seg_idx.flatten())
            coords.append(seg_coords.reshape(-1, 3))
            prefix.append(seg_prefix.flatten())
            start = offset
        return cls(segments, groups, torch.cat(sample_idx), torch.cat(coords), torch.cat(prefix),
                   num_samples, num_prefix)

    # ------------------------------------------------------------------ packing token features
    def pack(self, group_tokens: Sequence[Tensor]) -> Tensor:
        """(T, D) sequence from per-group ``(B_g, n_g, D)`` tokens (prefix tokens included)."""
        pieces = []
        for g in self.packed_group_order():
            tokens, length = group_tokens[g], self.groups[g].row_length
            if tokens.shape[1] < length:
                tokens = F.pad(tokens, (0, 0, 0, length - tokens.shape[1]))
            pieces.append(tokens.flatten(0, 1))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def segment_rows(self, x: Tensor) -> list[Tensor]:
        """``x`` (T, ...) cut into each segment's ``(batch, length, ...)`` rows.

        One ``split`` rather than a slice per segment: its backward is one concatenation, where
        each slice's backward would fill a zero tensor of the whole sequence.
        """
        if len(self.segments) == 1:
            return [self.segments[0].rows(x)]
        pieces = x.split([seg.size for seg in self.segments])
        return [seg.as_rows(piece) for piece, seg in zip(pieces, self.segments)]

    def group_tokens(self, x: Tensor, g: int, with_prefix: bool = False) -> Tensor:
        """Group ``g``'s tokens from the packed ``x``: ``(B_g, n_g, D)``."""
        group = self.groups[g]
        rows = x[group.start:group.start + len(group.sample_ids) * group.row_length]
        rows = rows.unflatten(0, (len(group.sample_ids), group.row_length))
        first = 0 if with_prefix else self.num_prefix
        return rows[:, first:self.num_prefix + group.num_tokens]

    def group_grid(self, x: Tensor, g: int) -> Tensor:
        """Group ``g``'s patch tokens as a channels-first image: ``(B_g, D, *grid)``."""
        tokens = self.group_tokens(x, g)
        grid = self.groups[g].grid
        return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1]).movedim(-1, 1)

    def per_sample(self, x: Tensor, with_prefix: bool = False) -> list[Tensor]:
        """Each sample's tokens, in batch order (views, no copy)."""
        out: list[Tensor | None] = [None] * self.num_samples
        for g, group in enumerate(self.groups):
            tokens = self.group_tokens(x, g, with_prefix)
            for row, s in enumerate(group.sample_ids.tolist()):
                out[s] = tokens[row]
        return out

    # ------------------------------------------------------------------ attention
    @functools.cached_property
    def row_offsets(self) -> tuple[Tensor, int] | None:
        """(rows + 1,) start of every sample's row in the packed sequence and the longest row, or
        None when the sequence stores padding (``padded`` mode)."""
        if any(seg.key_mask is not None and seg.gather is None for seg in self.segments):
            return None
        lengths = [seg.key_mask.sum(1) if seg.gather is not None
                   else torch.full((seg.batch,), seg.length, device=self.sample_idx.device) for seg in self.segments]
        offsets = torch.cat([lengths[0].new_zeros(1), torch.cat(lengths).cumsum(0)])
        return offsets, max(seg.length for seg in self.segments)

    def varlen_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention within each sample as one variable-length call (SDPA on nested jagged tensors).

        The CUDA path: one kernel launch for the whole batch, whatever the shapes.
        """
        offsets, max_len = self.row_offsets

        def jagged(t: Tensor) -> Tensor:
            return torch.nested.nested_tensor_from_jagged(t, offsets, max_seqlen=max_len).transpose(1, 2)

        out = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v))
        return out.transpose(1, 2).values()

    def self_attention(self, q: Tensor, k: Tensor, v: Tensor, need_weights: bool = False,
                       varlen: bool | None = None):
        """Attention of (T, H, hd) queries/keys/values within each sample.

        Returns the (T, H, hd) output and, when ``need_weights``, one ``(B, H, n, n)`` weight tensor
        per segment; the output is then those weights times the values (one attention computed, not two;
        equal to the fused kernel's to float rounding). ``varlen`` (default: on CUDA,
        when the batch has more than one segment or a padded one, and no weights are asked for) runs
        :meth:`varlen_attention` instead of one dense call per segment.
        """
        if varlen is None:
            varlen = (q.is_cuda and not need_weights and self.row_offsets is not None
                      and (len(self.segments) > 1 or self.segments[0].key_mask is not None))
        if varlen:
            if need_weights or self.row_offsets is None:
                raise UserError("varlen attention needs a compact layout (packing='grouped') and no weights")
            return self.varlen_attention(q, k, v), []
        outs, weights = [], []
        for seg, *qkv in zip(self.segments, *(self.segment_rows(t) for t in (q, k, v))):
            qs, ks, vs = (t.transpose(1, 2) for t in qkv)
            mask = None if seg.key_mask is None else seg.key_mask[:, None, None, :]
            if need_weights:
                weights.append(_attention_weights(qs, ks, mask))
                out = weights[-1] @ vs
            else:
                out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
            outs.append(seg.from_rows(out.transpose(1, 2)))
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), weights

    def attend_latents(self, q: Tensor, k: Tensor, v: Tensor):
        """Every token attends to the latents of its own sample.

        ``q``: (T, H, hd) token queries; ``k``, ``v``: (S, H, L, hd) per-sample latents.
        Returns the (T, H, hd) output and the (T, H, L) attention weights.
        """
        outs, weights = [], []
        for seg, rows in zip(self.segments, self.segment_rows(q)):
            qs = rows.transpose(1, 2)  # (B, H, n, hd)
            attn = (qs * qs.shape[-1] ** -0.5) @ k[seg.sample_ids].transpose(-1, -2)
            attn = attn.softmax(-1)
            outs.append(seg.from_rows((attn @ v[seg.sample_ids]).transpose(1, 2)))
            weights.append(seg.from_rows(attn.transpose(1, 2)))
        cat = (lambda t: t[0]) if len(outs) == 1 else torch.cat
        return cat(outs), cat(weights)

    def read_tokens(self, q: Tensor, k: Tensor, v: Tensor, need_weights: bool = False):
        """Shared latent queries read each sample's tokens.

        ``q``: (Q, H, hd) queries; ``k``, ``v``: (T, H, hd) token keys/values.
        Returns (S, Q, H, hd) in batch order and, on request, per-sample (H, Q, n_i) weights.
        """
        out = q.new_zeros(self.num_samples, q.shape[0], q.shape[1], q.shape[2])
        weights: list[Tensor | None] = [None] * self.num_samples
        for seg, k_rows, v_rows in zip(self.segments, self.segment_rows(k), self.segment_rows(v)):
            ks, vs = k_rows.transpose(1, 2), v_rows.transpose(1, 2)
            qs = q.transpose(0, 1).unsqueeze(0).expand(seg.batch, -1, -1, -1)
            mask = None if seg.key_mask is None else seg.key_mask[:, None, None, :]
            res = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
            out = out.index_copy(0, seg.sample_ids, res.transpose(1, 2))
            if need_weights:
                w = _attention_weights(qs, ks, mask)
                for row, s in enumerate(seg.sample_ids.tolist()):
                    n = int(seg.key_mask[row].sum()) if seg.key_mask is not None else seg.length
                    weights[s] = w[row, :, :, :n]
        return out, weights

    def mean_pool(self, x: Tensor) -> Tensor:
        """(S, D) mean of each sample's patch tokens (prefix and padding excluded)."""
        keep = self.is_patch
        sums = x.new_zeros(self.num_samples, x.shape[-1]).index_add(0, self.sample_idx[keep], x[keep])
        counts = torch.bincount(self.sample_idx[keep], minlength=self.num_samples)
        return sums / counts[:, None].to(x.dtype)

    def prefix_pool(self, x: Tensor) -> Tensor:
        """(S, D) class token of each sample."""
        return x[self.first_positions]


def _attention_weights(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        attn = attn.masked_fill(~mask, float("-inf"))
    return attn.softmax(-1)


def _buckets_by_length(lengths: Sequence[int], sizes: Sequence[int], max_padding: float) -> list[list[int]]:
    """Groups in order of token count, cut into runs whose padding to the run's longest stays within
    ``max_padding`` of their real tokens (equal counts never pad)."""
    buckets: list[list[int]] = []
    real = rows = 0
    for g in sorted(range(len(lengths)), key=lambda g: (lengths[g], g)):
        new_real, new_rows = real + sizes[g] * lengths[g], rows + sizes[g]
        if buckets and new_rows * lengths[g] <= (1 + max_padding) * new_real:
            buckets[-1].append(g)
            real, rows = new_real, new_rows
        else:
            buckets.append([g])
            real, rows = sizes[g] * lengths[g], sizes[g]
    return buckets


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _segment_tokens(rows_grid: Tensor, sample_ids: Tensor, length: int, num_prefix: int):
    """Per-token tables of one segment whose rows have (z, y, x) token grids ``rows_grid`` (rows, 3).

    Returns ``(rows, length)`` sample index (-1 on padding), ``(rows, length, 3)`` integer grid
    coordinates (0 on prefix and padding), the prefix mask and the real-token mask.
    """
    j = torch.arange(length, device=rows_grid.device)
    valid = j < (num_prefix + rows_grid.prod(1))[:, None]
    is_prefix = (j < num_prefix).expand_as(valid)
    q = (j - num_prefix).clamp(min=0)
    gy, gx = rows_grid[:, 1:2], rows_grid[:, 2:3]
    coords = torch.stack([q // (gy * gx), (q // gx) % gy, q % gx], -1)
    coords = coords.masked_fill((~valid | is_prefix)[..., None], 0)
    return torch.where(valid, sample_ids[:, None], -1), coords, is_prefix, valid
