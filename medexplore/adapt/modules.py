"""The small trainable parts that adaptation adds to a frozen Medformer.

Wrappers keep the module they change as ``.base``, so its pretrained tensors keep their values and
can be recovered (LoRA merges back into it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..models.packing import TokenLayout

__all__ = ["ParallelAdapter", "LoRALinear", "PromptTokens", "GatedExperts", "StaticMixture"]


class ParallelAdapter(nn.Module):
    """AdaptFormer's parallel bottleneck beside a block's MLP: ``mlp(h) + scale * up(relu(down(h)))``.

    ``up`` starts at zero, so the adapted block computes exactly what the pretrained one did.
    ``scale`` is learned (AdaptFormer fixes it at 0.1, the initial value here).
    """

    def __init__(self, base: nn.Module, dim: int, bottleneck: int, scale: float = 0.1):
        super().__init__()
        if bottleneck < 1:
            raise UserError(f"adapter bottleneck must be >= 1, got {bottleneck}")
        self.base = base
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.base(h) + self.scale * self.up(torch.relu(self.down(h)))


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * B A x`` with ``B`` zero at start; :meth:`merged` folds it into one Linear."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA wraps nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        ref = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=ref.device, dtype=ref.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=ref.device, dtype=ref.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (``W + scaling * B A``)."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        out.weight.copy_(self.base.weight + self.scaling * self.lora_b @ self.lora_a)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        out.weight.requires_grad_(self.base.weight.requires_grad)
        if out.bias is not None:
            out.bias.requires_grad_(self.base.bias.requires_grad)
        return out


class PromptTokens(nn.Module):
    """Visual prompt tuning (VPT): ``num_tokens`` learned tokens in every sample's row, after the class token.

    Each sample gets its own copy in its own row of the packed sequence, so prompts are attended
    only by that sample's tokens. Shallow prompts are written once, before the first block; deep
    prompts are rewritten before every block (the previous block's prompt outputs are dropped).
    """

    def __init__(self, num_tokens: int, dim: int, depth: int, deep: bool = False):
        super().__init__()
        if num_tokens < 0:
            raise UserError(f"prompt tuning needs >= 0 prompt tokens, got {num_tokens}")
        self.num_tokens, self.deep = num_tokens, deep
        self.tokens = nn.Parameter(torch.empty(depth if deep else 1, num_tokens, dim))
        nn.init.trunc_normal_(self.tokens, std=0.02)

    def forward(self, x: Tensor, layout: TokenLayout, block: int) -> Tensor:
        """``x`` with the prompt slots of every sample set to block ``block``'s prompts."""
        if (block > 0 and not self.deep) or not self.num_tokens:
            return x
        slot = layout.positions_in_row - (layout.num_prefix - self.num_tokens)
        is_prompt = layout.is_prefix & (slot >= 0)
        values = self.tokens[block if self.deep else 0].to(x.dtype)[slot.clamp(0, self.num_tokens - 1)]
        return torch.where(is_prompt[:, None], values, x)


class GatedExperts(nn.Module):
    """One body block as an input-dependent mixture of E expert blocks (the GMoE-Adapter's gate).

    The gate reads each sample's mean patch token (or, ``per_token``, every token), layer-normalised
    without parameters when ``normalize`` (as a V-MoE router reads the normalised tokens), and gives
    softmax weights over the experts; the block's output is the weighted sum of the experts' outputs.
    The gate starts at zero (equal weights). Normalising matters for how fast it learns: Adam moves
    each gate weight by about the learning rate per step, so the logits move in proportion to the
    input's size, and a body's raw tokens are small (mean tokens of norm 1.1-1.3 over 128 channels in
    ``medformer-medmnist-embedded-v2``, against sqrt(128) ~ 11 normalised). After each forward,
    ``gate_weights`` holds the (S, E) weights of each sample (per-token weights averaged over its tokens).
    """

    def __init__(self, experts: list[nn.Module], dim: int, per_token: bool = False, normalize: bool = True):
        super().__init__()
        if len(experts) < 2:
            raise UserError(f"a mixture needs >= 2 experts, got {len(experts)}")
        self.experts = nn.ModuleList(experts)
        self.per_token = per_token
        self.normalize = normalize
        self.gate = nn.Linear(dim, len(experts))
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.gate_weights: Tensor | None = None

    def _logits(self, x: Tensor) -> Tensor:
        return self.gate(F.layer_norm(x, x.shape[-1:]) if self.normalize else x)

    def mixing_weights(self, x: Tensor, layout: TokenLayout) -> tuple[Tensor, Tensor]:
        """(T, E) weights of every token and (S, E) weights of every sample."""
        rows = layout.sample_idx.clamp(min=0)
        if self.per_token:
            tokens = self._logits(x).softmax(-1)
            real = (layout.sample_idx >= 0).to(tokens.dtype)[:, None]
            sums = tokens.new_zeros(layout.num_samples, tokens.shape[1]).index_add(0, rows, tokens * real)
            return tokens, sums / sums.sum(-1, keepdim=True)
        samples = self._logits(layout.mean_pool(x)).softmax(-1)
        return samples[rows], samples

    def forward(self, x: Tensor, layout: TokenLayout, rope=None, need_weights: bool = False):
        token_w, sample_w = self.mixing_weights(x, layout)
        self.gate_weights = sample_w
        out, attn = None, None
        for e, expert in enumerate(self.experts):
            y, weights = expert(x, layout, rope, need_weights)
            term = token_w[:, e:e + 1].to(y.dtype) * y
            out = term if out is None else out + term
            if need_weights:  # each segment's attention, mixed with the sample weights
                mixed = [sample_w[seg.sample_ids, e][:, None, None, None] * w
                         for seg, w in zip(layout.segments, weights)]
                attn = mixed if attn is None else [a + m for a, m in zip(attn, mixed)]
        return out, attn or []


class StaticMixture(nn.Module):
    """``sum_e softmax(logits)_e * expert_e(x)`` with learned, input-independent logits (zero at start).

    Used for the GMoE-Adapter's patch embedding; ``grid``, ``embed``, ``patches`` and ``project`` are forwarded
    so a mixture of patch embeddings stands in for one.
    """

    def __init__(self, experts: list[nn.Module]):
        super().__init__()
        if len(experts) < 2:
            raise UserError(f"a mixture needs >= 2 experts, got {len(experts)}")
        self.experts = nn.ModuleList(experts)
        self.logits = nn.Parameter(torch.zeros(len(experts)))

    def grid(self, *args, **kwargs):
        return self.experts[0].grid(*args, **kwargs)

    def patches(self, images: Tensor) -> Tensor:
        return self.experts[0].patches(images)

    def embed(self, groups) -> Tensor:
        w = self.weights
        return sum(w[e].to(groups[0].dtype) * expert.embed(groups) for e, expert in enumerate(self.experts))

    def project(self, patches: Tensor, *args) -> Tensor:
        w = self.weights
        return sum(w[e].to(patches.dtype) * expert.project(patches, *args) for e, expert in enumerate(self.experts))

    @property
    def weights(self) -> Tensor:
        return self.logits.softmax(0)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weights
        return sum(w[e].to(x.dtype) * expert(x) for e, expert in enumerate(self.experts))
