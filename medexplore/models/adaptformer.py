"""Input and Output Adaptformers: cross-attention between tokens and learnable latents."""
from __future__ import annotations

import math

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from ..errors import UserError
from .config import DomainVocab
from .packing import TokenLayout
from .tasks import DIMENSIONALITIES, TaskSpec

__all__ = ["InputAdaptformer", "OutputAdaptformer"]


class InputAdaptformer(nn.Module):
    """Tokens cross-attend to learnable latents of their sample's domain, with a residual.

    Every value of each attribute (dimensionality, modality, body part) owns ``num_latents``
    latents; row 0 of the modality and body-part tables is ``unknown``. A token's keys/values are the
    ``3 * num_latents`` latents of its own sample, so its attention over them (returned per token)
    shows which domain knowledge it draws on.
    """

    def __init__(self, dim: int, num_heads: int, vocab: DomainVocab, num_latents: int = 4):
        super().__init__()
        self.num_heads, self.num_latents = num_heads, num_latents
        self.dimensionality_latents = nn.Parameter(torch.randn(len(DIMENSIONALITIES), num_latents, dim) * 0.02)
        self.modality_latents = nn.Parameter(torch.randn(vocab.num_modalities, num_latents, dim) * 0.02)
        self.body_part_latents = nn.Parameter(torch.randn(vocab.num_body_parts, num_latents, dim) * 0.02)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.norm_latents = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))  # residual scale, small at start

    @property
    def latent_names(self) -> tuple[str, ...]:
        """Names of the latent slots a token attends to, in order (for plots)."""
        return tuple(f"{attr}[{i}]" for attr in ("dimensionality", "modality", "body_part")
                     for i in range(self.num_latents))

    def sample_latents(self, domain_index: Tensor) -> Tensor:
        """(S, 3 * num_latents, D) latents of each sample from its (S, 3) domain indices."""
        return torch.cat([self.dimensionality_latents[domain_index[:, 0]],
                          self.modality_latents[domain_index[:, 1]],
                          self.body_part_latents[domain_index[:, 2]]], 1)

    def forward(self, x: Tensor, layout: TokenLayout, domain_index: Tensor,
                need_weights: bool = True) -> tuple[Tensor, Tensor | None]:
        """Updated (T, D) tokens and, on request, (T, 3 * num_latents) head-averaged attention over the latents."""
        h, hd = self.num_heads, x.shape[-1] // self.num_heads
        q = self.q(self.norm(x)).unflatten(-1, (h, hd))
        latents = self.norm_latents(self.sample_latents(domain_index))
        k, v = self.kv(latents).unflatten(-1, (2, h, hd)).permute(2, 0, 3, 1, 4)  # 2 x (S, H, L, hd)
        out, weights = layout.attend_latents(q, k, v)
        return x + self.gamma * self.proj(out.flatten(1)), weights.mean(1) if need_weights else None

    @torch.no_grad()
    def extend_vocab(self, old: DomainVocab, new: DomainVocab) -> None:
        """Grow the modality/body-part tables to ``new``; added values start from ``unknown``'s latents."""
        for attr, old_names, new_names in (("modality_latents", old.modalities, new.modalities),
                                           ("body_part_latents", old.body_parts, new.body_parts)):
            if new_names[:len(old_names)] != old_names:
                raise UserError(f"extend_vocab: {attr} must keep the existing order {old_names}, got {new_names}")
            table = getattr(self, attr)
            added = table[:1].expand(len(new_names) - len(old_names), -1, -1)
            setattr(self, attr, nn.Parameter(torch.cat([table, added.clone()])))


class OutputAdaptformer(nn.Module):
    """Each task owns latent queries that read its sample's tokens; one attention call serves all tasks.

    The values also carry Fourier features of each token's position within its image
    (``position_values``, zero at start): with rotary positions the tokens themselves hold no
    absolute position, and a query must be able to read *where* it attended to place a box.
    """

    def __init__(self, dim: int, num_heads: int, tasks: list[TaskSpec], mlp_ratio: float = 4.0,
                 position_frequencies: int = 4):
        super().__init__()
        self.num_heads = num_heads
        self.queries = nn.ParameterDict({t.name: nn.Parameter(torch.randn(t.queries, dim) * 0.02) for t in tasks})
        self.norm_q = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(position_frequencies).float(), persistent=False)
        self.position_values = nn.Linear(3 * 2 * position_frequencies, dim)
        nn.init.zeros_(self.position_values.weight)
        nn.init.zeros_(self.position_values.bias)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def add_task(self, task: TaskSpec) -> None:
        ref = self.q.weight  # the module's device and dtype, also before any task exists
        self.queries[task.name] = nn.Parameter(torch.randn(task.queries, ref.shape[1], device=ref.device,
                                                           dtype=ref.dtype) * 0.02)

    def forward(self, x: Tensor, layout: TokenLayout, need_weights: bool = False):
        """Per task ``(S, Q_t, D)`` query outputs and, on request, per task per-sample (H, Q_t, n_i) weights."""
        if not len(self.queries):
            return {}, {}
        names = list(self.queries.keys())
        sizes = [self.queries[n].shape[0] for n in names]
        queries = torch.cat([self.queries[n] for n in names])
        h, hd = self.num_heads, x.shape[-1] // self.num_heads
        q = self.q(self.norm_q(queries)).unflatten(-1, (h, hd))
        k, v = self.kv(x).unflatten(-1, (2, h, hd)).unbind(1)
        angles = (layout.unit_coords[:, :, None] * self.frequencies).flatten(1).to(x.dtype)
        v = v + self.position_values(torch.cat([angles.sin(), angles.cos()], -1)).unflatten(-1, (h, hd))
        read, weights = layout.read_tokens(q, k, v, need_weights)
        out = queries + self.proj(read.flatten(2))
        out = out + self.mlp(self.norm_mlp(out))
        outputs = dict(zip(names, out.split(sizes, dim=1)))
        split_weights = {}
        if need_weights:
            for name, lo, size in zip(names, torch.tensor([0] + sizes).cumsum(0).tolist(), sizes):
                split_weights[name] = [w[:, lo:lo + size] for w in weights]
        return outputs, split_weights
