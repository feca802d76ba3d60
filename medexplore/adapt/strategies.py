"""Adaptation strategies (Med-VTAB): which parts of a pretrained Medformer learn, and what is added.

Every strategy trains the *task side* (Output Adaptformer and heads: a new task needs its queries and
head) and differs in what of the backbone (patch embedding, Input Adaptformer, blocks, final norm)
learns:

=============  ==============================================================================
full           everything
linear         nothing of the backbone (a probe on frozen features)
partial        the last ``blocks`` blocks and the final norm
adapter        parallel bottleneck adapters beside every block's MLP (AdaptFormer)
vpt_shallow    ``prompts`` tokens written before the first block (VPT-shallow)
vpt_deep       ``prompts`` tokens rewritten before every block (VPT-deep)
lora           rank-``rank`` updates of every block's ``attn.qkv`` and ``attn.proj`` (mergeable)
gmoe           GMoE-Adapter: every block a gated mixture of the experts' adapted blocks
=============  ==============================================================================

LoRA is written here rather than taken from PEFT: PEFT would bring transformers and accelerate
into the install and rename the wrapped modules' keys its own way, while a LoRA layer is 30 lines
whose merge is tested against the unmerged layer, and the adapters, prompts and gates need the
same freezing and reporting code anyway.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..errors import UserError
from ..models.medformer import Medformer
from ..typed import coerce_fields
from .modules import GatedExperts, LoRALinear, ParallelAdapter, PromptTokens, StaticMixture

__all__ = ["STRATEGIES", "AdaptConfig", "AdaptReport", "apply_strategy", "rebuild_adaptation", "merge_lora",
           "trainable_report", "model_from_spec"]

STRATEGIES = ("full", "linear", "partial", "adapter", "vpt_shallow", "vpt_deep", "lora", "gmoe")
EXPERT_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "patch_size", "patch_size_3d", "in_chans",
                 "pos_embed", "class_token")
LORA_TARGETS = ("qkv", "proj")
TASK_SIDE = ("output_adaptformer.", "heads.")


@dataclass(frozen=True)
class AdaptConfig:
    """A strategy and its sizes (a config's ``adapt`` section).

    Args:
        strategy: one of :data:`STRATEGIES`.
        blocks: ``partial``: how many of the last blocks learn.
        bottleneck, adapter_scale: ``adapter``/``gmoe``: adapter width and initial scale.
        prompts: ``vpt_*``: prompt tokens per sample (0 leaves the frozen model as it is).
        rank, alpha: ``lora``: rank and scaling numerator (``alpha / rank``; default ``alpha = rank``).
        gate_per_token: ``gmoe``: one gate per token instead of per sample.
        gate_norm: ``gmoe``: the gate reads layer-normalised tokens (False: raw tokens, as checkpoints from
            before 2026-12-05 do; their gates learned slowly, see :class:`GatedExperts`).
        expert_names: ``gmoe``: a name per expert, the model's own weights first.
        weights: backbone weights loaded before adapting: a medexplore checkpoint folder, a timm
            weights file (``.safetensors``, ``.pth``, ``.bin``, ``.npz`` excluded) or a timm model name.
        general: ``gmoe``: the general expert's weights (same forms as ``weights``).
    """

    strategy: str = "full"
    blocks: int = 2
    bottleneck: int = 16
    adapter_scale: float = 0.1
    prompts: int = 10
    rank: int = 4
    alpha: float | None = None
    gate_per_token: bool = False
    gate_norm: bool = True
    expert_names: tuple[str, ...] = ("medical", "general")
    weights: str | None = None
    general: str | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise UserError(f"adapt.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("blocks", "bottleneck", "rank"):
            if getattr(self, name) < 1:
                raise UserError(f"adapt.{name} must be >= 1, got {getattr(self, name)}")
        if self.prompts < 0:
            raise UserError(f"adapt.prompts must be >= 0 (0: the frozen model), got {self.prompts}")
        if self.alpha is not None and not self.alpha > 0:
            raise UserError(f"adapt.alpha must be > 0, got {self.alpha}")

    def check_sources(self) -> None:
        """The weights a run needs are named (``gmoe`` needs its general expert)."""
        if self.strategy == "gmoe" and not self.general:
            raise UserError("adapt.strategy gmoe needs adapt.general: the general expert's weights (a checkpoint "
                             "folder, a timm weights file or a timm name)")

    @classmethod
    def from_dict(cls, d: dict) -> "AdaptConfig":
        return cls(**coerce_fields(cls, dict(d), "adapt"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["expert_names"] = list(self.expert_names)
        return d


@dataclass(frozen=True)
class AdaptReport:
    """What learns after adapting: trainable parameters (of which in the backbone, i.e. outside the task
    side) and all parameters."""

    strategy: str
    trainable: int
    total: int
    backbone_trainable: int = 0

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"{self.strategy}: {self.trainable:,} of {self.total:,} parameters learn ({100 * self.fraction:.2f}%), "
                f"{self.backbone_trainable:,} of them in the backbone")


def trainable_report(model: nn.Module, strategy: str = "") -> AdaptReport:
    params = dict(model.named_parameters())
    trainable = {n: p.numel() for n, p in params.items() if p.requires_grad}
    backbone = sum(v for n, v in trainable.items() if not n.startswith(TASK_SIDE))
    return AdaptReport(strategy, sum(trainable.values()), sum(p.numel() for p in params.values()), backbone)


# ---------------------------------------------------------------------------- structure
def _wrap_adapters(block: nn.Module, dim: int, cfg: AdaptConfig) -> None:
    block.mlp = ParallelAdapter(block.mlp, dim, cfg.bottleneck, cfg.adapter_scale)


def _wrap_lora(block: nn.Module, cfg: AdaptConfig) -> None:
    for name in LORA_TARGETS:
        setattr(block.attn, name, LoRALinear(getattr(block.attn, name), cfg.rank, cfg.alpha))


def _check_experts(model: Medformer, experts, names) -> None:
    if not experts:
        raise UserError("gmoe needs at least one more expert (e.g. the general-pretrained backbone)")
    if len(names) != 1 + len(experts):
        raise UserError(f"adapt.expert_names {list(names)} must name {1 + len(experts)} experts (the model's own first)")
    for i, expert in enumerate(experts, 1):
        if not isinstance(expert, Medformer):
            raise TypeError(f"expert {i} must be a Medformer, got {type(expert).__name__}")
        differ = [f"{f}: {getattr(model.config, f)} vs {getattr(expert.config, f)}" for f in EXPERT_FIELDS
                  if getattr(model.config, f) != getattr(expert.config, f)]
        if differ:
            raise UserError(f"gmoe expert {i} has another architecture than the model ({'; '.join(differ)}); "
                             "experts must share width, depth, heads, patch size, channels and positions")


def _build_structure(model: Medformer, cfg: AdaptConfig, experts) -> None:
    d = model.config.embed_dim
    if cfg.strategy == "partial" and cfg.blocks > len(model.blocks):
        raise UserError(f"adapt.blocks {cfg.blocks} exceeds the model's depth {len(model.blocks)}")
    if cfg.strategy == "adapter":
        for block in model.blocks:
            _wrap_adapters(block, d, cfg)
    elif cfg.strategy == "lora":
        for block in model.blocks:
            _wrap_lora(block, cfg)
    elif cfg.strategy in ("vpt_shallow", "vpt_deep"):
        model.prompts = PromptTokens(cfg.prompts, d, len(model.blocks), deep=cfg.strategy == "vpt_deep").to(
            device=model.norm.weight.device, dtype=model.norm.weight.dtype)
    elif cfg.strategy == "gmoe":
        _check_experts(model, experts, cfg.expert_names)
        others = [copy.deepcopy(e).to(device=model.norm.weight.device, dtype=model.norm.weight.dtype) for e in experts]
        for i in range(len(model.blocks)):
            blocks = [model.blocks[i]] + [e.blocks[i] for e in others]
            for block in blocks:
                _wrap_adapters(block, d, cfg)
            model.blocks[i] = GatedExperts(blocks, d, cfg.gate_per_token, cfg.gate_norm).to(
                device=model.norm.weight.device, dtype=model.norm.weight.dtype)
        model.patch_embed = StaticMixture([model.patch_embed] + [e.patch_embed for e in others])


def _trainable_names(model: Medformer, cfg: AdaptConfig) -> tuple[set[str], list[str]]:
    """Parameter-name prefixes that learn, and the names of modules kept in eval mode."""
    task_side = set(TASK_SIDE)
    backbone = ["patch_embed", "input_adaptformer", "blocks", "norm"]
    backbone = [m for m in backbone if getattr(model, m, None) is not None]
    if cfg.strategy == "full":
        return {""}, []
    if cfg.strategy == "partial":
        first = len(model.blocks) - cfg.blocks
        learn = task_side | {f"blocks.{i}." for i in range(first, len(model.blocks))} | {"norm."}
        frozen = [m for m in backbone if m not in ("blocks", "norm")] + [f"blocks.{i}" for i in range(first)]
        return learn, frozen
    extra = {"linear": set(), "adapter": {".mlp.down.", ".mlp.up.", ".mlp.scale"},
             "vpt_shallow": {"prompts."}, "vpt_deep": {"prompts."}, "lora": {".lora_a", ".lora_b"},
             "gmoe": {".mlp.down.", ".mlp.up.", ".mlp.scale", ".gate.", "patch_embed.logits"}}[cfg.strategy]
    return task_side | extra, backbone


def _freeze(model: Medformer, cfg: AdaptConfig) -> None:
    learn, frozen = _trainable_names(model, cfg)
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.startswith(p) or (p.startswith(".") and p in name) for p in learn))
    model.frozen_modules = frozen
    model.train(model.training)


def apply_strategy(model: Medformer, cfg: AdaptConfig | dict | str, experts=()) -> AdaptReport:
    """Adapt ``model`` in place (freeze, add adapters/prompts/LoRA or mix in ``experts``); returns what learns.

    The model remembers the adaptation (``model.adaptation``), so its checkpoints rebuild the same
    structure. Frozen modules stay in eval mode under ``model.train()``.

    Example:
        >>> from medexplore.models import create_model, TaskSpec
        >>> m = create_model("medformer_tiny", tasks=[TaskSpec("y", "binary", 1)], depth=2)
        >>> print(apply_strategy(m, "lora"))  # doctest: +ELLIPSIS
        lora: ... parameters learn (...%)
    """
    cfg = AdaptConfig(strategy=cfg) if isinstance(cfg, str) else AdaptConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(model, Medformer):
        raise TypeError(f"apply_strategy adapts a Medformer, got {type(model).__name__}")
    if model.adaptation is not None:
        raise UserError(f"the model is already adapted ({model.adaptation['strategy']}); start from the pretrained one")
    _build_structure(model, cfg, list(experts))
    _freeze(model, cfg)
    model.adaptation = {**cfg.to_dict(), "num_experts": 1 + len(experts) if cfg.strategy == "gmoe" else 1,
                        "merged": False}
    return trainable_report(model, cfg.strategy)


def model_from_spec(spec: dict) -> Medformer:
    """The model a checkpoint's ``meta["model"]`` describes, adapted structure included (weights aside)."""
    if not isinstance(spec, dict):
        raise UserError("model description must be a dict with 'config' and 'tasks'")
    model = Medformer.from_spec_dict({k: v for k, v in spec.items() if k != "adaptation"})
    if spec.get("adaptation"):
        rebuild_adaptation(model, spec["adaptation"])
    return model


def rebuild_adaptation(model: Medformer, spec: dict) -> None:
    """Recreate a checkpoint's adapted structure on a freshly built model (weights are loaded after)."""
    known = {f.name for f in fields(AdaptConfig)}
    if spec.get("strategy") == "gmoe":  # written before the gate read normalised tokens: keep its raw ones
        spec = {"gate_norm": False, **spec}
    cfg = AdaptConfig.from_dict({k: v for k, v in spec.items() if k in known})
    if cfg.strategy == "lora" and spec.get("merged"):
        _freeze(model, cfg)
        model.adaptation = dict(spec)
        return
    experts = [model] * (int(spec.get("num_experts", 2)) - 1) if cfg.strategy == "gmoe" else []
    apply_strategy(model, cfg, experts)


@torch.no_grad()
def merge_lora(model: Medformer) -> Medformer:
    """Fold every LoRA update into its Linear (same outputs, no extra cost at inference)."""
    if not model.adaptation or model.adaptation.get("strategy") != "lora":
        raise UserError("merge_lora: the model is not LoRA-adapted")
    for block in model.blocks:
        for name in LORA_TARGETS:
            layer = getattr(block.attn, name)
            if isinstance(layer, LoRALinear):
                setattr(block.attn, name, layer.merged())
    model.adaptation = {**model.adaptation, "merged": True}
    return model
