"""Medformer: one transformer for packed batches of 2D and 3D images and many tasks."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import UserError
from .adaptformer import InputAdaptformer, OutputAdaptformer
from .blocks import Block
from .config import DomainVocab, MedformerConfig
from .findings import check_pairs
from .heads import HeadContext, LabelError
from .inference_defaults import InferenceDefaults
from .kinds import HeadDims, kind_entry
from .packing import Batch, TokenLayout
from .rope import Rotary3D
from .segmentation import feature_depths
from .tasks import TaskSpec
from .tokenizer import LearnedPositions, PatchEmbed

__all__ = ["Medformer", "MedformerOutput"]


@dataclass
class MedformerOutput:
    """What a forward pass returns.

    Attributes:
        predictions: per task name, the head's prediction (see each head for its form).
        embedding: (S, D) pooled embedding of each sample.
        tokens: (T, D) final normalised packed tokens, laid out by ``layout``.
        layout: the packing of this batch.
        input_attention: on request, (T, L) each token's attention over its domain latents.
        attentions: on request, per block one list of (B, H, n, n) weights per segment.
        query_attention: on request, per task a list of per-sample (H, Q, n_i) weights.
        gates: for gated mixtures of experts (GMoE-Adapter), per block name the (S, E) weights of
            each sample over the experts (softmax, rows sum to 1).
    """

    predictions: dict[str, object]
    embedding: Tensor
    tokens: Tensor
    layout: TokenLayout
    input_attention: Tensor | None = None
    attentions: list[list[Tensor]] = field(default_factory=list)
    query_attention: dict[str, list[Tensor]] = field(default_factory=dict)
    gates: dict[str, Tensor] = field(default_factory=dict)


class Medformer(nn.Module):
    """Tokenizer -> Input Adaptformer -> timm-compatible body -> Output Adaptformer -> task heads.

    Example:
        >>> from medexplore.models import create_model, TaskSpec, Batch, Domain
        >>> model = create_model("medformer_tiny", tasks=[TaskSpec("tumour", "binary", 1)],
        ...                      depth=2, patch_size=4)
        >>> batch = Batch.from_images([torch.rand(1, 28, 28), torch.rand(1, 28, 28, 28)],
        ...                           [Domain("2d", "xray", "chest"), Domain("3d", "mri", "brain")])
        >>> model(batch).predictions["tumour"].shape
        torch.Size([2])
    """

    def __init__(self, config: MedformerConfig, tasks: list[TaskSpec] = ()):
        super().__init__()
        self.config = config
        self.tasks: dict[str, TaskSpec] = {}
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, d, config.stem, config.patch_size_3d,
                                      config.stem_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if config.class_token else None
        self.pos = (LearnedPositions(config.pos_grid, config.num_prefix_tokens, d)
                    if "learned" in config.pos_embed else None)
        self.rope = Rotary3D(config.head_dim, config.rope_theta) if "rope" in config.pos_embed else None
        self.input_adaptformer = (InputAdaptformer(d, config.num_heads, config.vocab, config.domain_latents)
                                  if config.input_adaptformer else None)
        dpr = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.ModuleList(Block(d, config.num_heads, config.mlp_ratio, config.qkv_bias, dpr[i], config.layer_scale)
                                    for i in range(config.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.feature_depths = feature_depths(config.depth, max(config.patch_sizes.values()))
        self.output_adaptformer = OutputAdaptformer(d, config.num_heads, [], config.mlp_ratio) if config.output_adaptformer else None
        self.heads = nn.ModuleDict()
        self.prompts: nn.Module | None = None  # visual prompt tokens (medexplore.adapt)
        self.adaptation: dict | None = None  # how medexplore.adapt changed this model, for checkpoints
        self.frozen_modules: list[str] = []  # kept in eval mode by train()
        self.inference = InferenceDefaults()  # sliding window and thresholds on whole images, for checkpoints
        for task in tasks:
            self.add_task(task)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    # ------------------------------------------------------------------ tasks and domains
    def add_task(self, task: TaskSpec) -> None:
        """Add a task with its Output-Adaptformer queries and head (e.g. when fine-tuning)."""
        if not isinstance(task, TaskSpec):
            raise TypeError(f"add_task expects a TaskSpec, got {type(task).__name__}")
        if task.name in self.tasks:
            raise UserError(f"task {task.name!r} already exists; names must be unique")
        if kind_entry(task.kind).queries_per_output and self.output_adaptformer is None:
            raise UserError(f"task {task.name!r} ({task.kind.value}) needs one query per class or box, which the "
                             "Output Adaptformer provides; build the model with output_adaptformer=True")
        self.tasks[task.name] = task
        cfg = self.config
        dims = HeadDims(cfg.embed_dim, cfg.in_chans, cfg.patch_sizes, cfg.seg_channels, len(self.feature_depths),
                        cfg.seg_full_channels)
        head = kind_entry(task.kind).build_head(task, dims)
        ref = self.norm.weight
        self.heads[task.name] = head.to(device=ref.device, dtype=ref.dtype)
        if self.output_adaptformer is not None:
            self.output_adaptformer.add_task(task)

    def extend_domains(self, modalities=(), body_parts=()) -> DomainVocab:
        """Add modalities/body parts to the vocabulary (and latents for them); returns the new vocabulary."""
        new = self.config.vocab.extended(modalities, body_parts)
        if self.input_adaptformer is not None:
            self.input_adaptformer.extend_vocab(self.config.vocab, new)
        self.config = self.config.replace(vocab=new)
        return new

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in each sample's row: the class token, then any prompt tokens."""
        return self.config.num_prefix_tokens + (self.prompts.num_tokens if self.prompts is not None else 0)

    def train(self, mode: bool = True) -> "Medformer":
        """Like ``nn.Module.train``, but modules listed in ``frozen_modules`` stay in eval mode."""
        super().train(mode)
        for name in self.frozen_modules:
            self.get_submodule(name).eval()
        return self

    # ------------------------------------------------------------------ forward
    def layout(self, batch: Batch, packing: str = "grouped") -> TokenLayout:
        """Packing of ``batch``; raises ValueError for images the model cannot take."""
        grids = []
        for images, ids in zip(batch.groups, batch.group_samples):
            grids.append(self.patch_embed.grid(tuple(images.shape[1:]), where=f"image {int(ids[0])}"))
        shapes = [tuple(g.shape[2:]) for g in batch.groups]
        return TokenLayout.build(grids, batch.group_samples, shapes, batch.num_samples,
                                 self.num_prefix_tokens, packing, device=self.norm.weight.device)

    def embed(self, batch: Batch, layout: TokenLayout) -> Tensor:
        """(T, D) packed tokens with class tokens and learned positions.

        Patch tokens of every image with the same dimensionality and channel count are embedded by
        one matmul and written to their packed positions, so a batch of many shapes costs no more
        calls than a batch of one. Prompt slots (after the class token) and padding hold zeros here;
        the prompts themselves are written just before the body, so they carry no position.
        """
        dtype = self.norm.weight.dtype
        by_kind: dict[tuple[int, int], list[int]] = {}  # (spatial dims, channels) -> groups, in packed order
        for g in layout.packed_group_order():
            images = batch.groups[g]
            by_kind.setdefault((images.dim() - 2, images.shape[1]), []).append(g)
        x = None
        for (dims, channels), groups in by_kind.items():
            tokens = self.patch_embed.embed([batch.groups[g].to(dtype) for g in groups])
            if len(tokens) == layout.num_tokens:  # patch tokens only, already in packed order
                x = tokens
                break
            x = tokens.new_zeros(layout.num_tokens, tokens.shape[1]) if x is None else x
            x = x.index_copy(0, layout.patch_positions(groups), tokens)
        if self.cls_token is not None:
            first = layout.first_positions
            x = x.index_copy(0, first, self.cls_token[0].expand(len(first), -1))
        if self.pos is not None:
            x = x + self.pos(layout.coords, layout.is_prefix)
        return x

    def domain_index(self, batch: Batch) -> Tensor:
        vocab = self.config.vocab
        return torch.tensor([vocab.encode(d) for d in batch.domains], dtype=torch.long, device=self.norm.weight.device)

    def forward_features(self, batch: Batch, packing: str = "grouped", need_weights: bool = False):
        """Body only: ``(tokens (T, D), layout, features, input_attention, attentions)``."""
        layout = self.layout(batch, packing)
        x = self.embed(batch, layout)
        input_attention = None
        if self.input_adaptformer is not None:
            x, input_attention = self.input_adaptformer(x, layout, self.domain_index(batch), need_weights)
        rope = self.rope(layout.coords, layout.is_prefix) if self.rope is not None else None
        # ``features`` collects the token sequence after the blocks listed in ``feature_depths`` (shallow to
        # deep, one per decoder scale); the deepest entry is replaced by the normed output, so the
        # decoders and task heads read the same final tokens.
        features, attentions = [], []
        for i, block in enumerate(self.blocks):
            if self.prompts is not None:
                x = self.prompts(x, layout, i)
            x, weights = block(x, layout, rope, need_weights)
            if need_weights:
                attentions.append(weights)
            if i in self.feature_depths:
                features.append(x)
        x = self.norm(x)
        features[-1] = x
        return x, layout, features, input_attention, attentions

    def forward(self, batch: Batch, packing: str = "grouped", return_attention: bool = False,
                tasks: list[str] | None = None, grad_tasks: list[str] | None = None) -> MedformerOutput:
        """Predictions for every task (or only ``tasks``) and the pooled embedding of every sample of ``batch``.

        With gradients enabled, only the heads of ``grad_tasks`` (default: all) record them: an explanation
        of one task then skips the autograd bookkeeping of the others' decoders."""
        for option, names in (("tasks", tasks), ("grad_tasks", grad_tasks)):
            unknown = sorted(set(names or ()) - set(self.heads))
            if unknown:
                raise UserError(f"unknown task(s) {unknown} in {option}; the model has {sorted(self.heads)}")
        x, layout, features, input_attention, attentions = self.forward_features(batch, packing, return_attention)
        embedding = layout.prefix_pool(x) if self.cls_token is not None else layout.mean_pool(x)
        if self.output_adaptformer is not None:
            task_queries, query_attention = self.output_adaptformer(x, layout, return_attention)
        else:
            task_queries = {name: embedding[:, None] for name in self.tasks}
            query_attention = {}
        ctx = HeadContext(layout, batch, features)
        predictions = {}
        for name, head in self.heads.items():
            if tasks is None or name in tasks:
                with torch.set_grad_enabled(torch.is_grad_enabled() and (grad_tasks is None or name in grad_tasks)):
                    predictions[name] = head(task_queries[name], ctx)
        gates = {f"blocks.{i}": block.gate_weights for i, block in enumerate(self.blocks)
                 if getattr(block, "gate_weights", None) is not None}
        return MedformerOutput(predictions, embedding, x, layout, input_attention, attentions, query_attention, gates)

    # ------------------------------------------------------------------ losses
    @staticmethod
    def labelled_tasks(batch: Batch) -> list[str]:
        """Tasks with at least one label in ``batch``: the only heads a training step has to run."""
        return [name for name, labels in batch.targets.items() if any(y is not None for y in labels)]

    def compute_loss(self, output: MedformerOutput, batch: Batch, smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the per-task losses over the labels present, and each task's loss
        (``smoothing``: label smoothing of class targets, see :mod:`.heads`).

        A task with no label in the batch contributes nothing (its prediction is not needed, see
        :meth:`labelled_tasks`); a batch with no label at all gives a zero loss that still back-propagates.
        """
        unknown = sorted(set(batch.targets) - set(self.tasks))
        if unknown:
            raise LabelError(f"labels for unknown task(s) {unknown}; the model has {sorted(self.tasks)}")
        per_task, total = {}, None
        for name, labels in batch.targets.items():
            if all(y is None for y in labels):  # nothing to learn; the forward may have skipped its head
                continue
            spec = self.tasks[name]
            for i, y in enumerate(labels):
                if y is not None and not spec.applies_to(batch.domains[i]):
                    raise LabelError(f"task {name!r}, sample {i}: the task does not apply to domain {batch.domains[i]}")
            head = self.heads[name]
            # label smoothing reaches the heads that take it (built-in class heads); a registered kind's head
            # without a ``smoothing`` argument is called as before and its targets stay as they are
            if smoothing and _loss_takes_smoothing(type(head)):
                loss = head.loss(output.predictions[name], labels, smoothing)
            else:
                loss = head.loss(output.predictions[name], labels)
            if loss is None:
                continue
            per_task[name] = loss
            total = spec.weight * loss if total is None else total + spec.weight * loss
        if total is None:
            total = output.embedding.sum() * 0.0
        return total, per_task

    # ------------------------------------------------------------------ serialisation helpers
    def spec_dict(self) -> dict:
        """JSON-ready description sufficient to rebuild this model (weights aside), adaptation included."""
        spec = {"config": self.config.to_dict(), "tasks": [t.to_dict() for t in self.tasks.values()]}
        if self.adaptation is not None:
            spec["adaptation"] = dict(self.adaptation)
        if self.inference:
            spec["inference"] = self.inference.to_dict()
        return spec

    @classmethod
    def from_spec_dict(cls, spec: dict) -> "Medformer":
        """The plain model a :meth:`spec_dict` describes; an adapted one is rebuilt by
        :func:`medexplore.adapt.model_from_spec`, which adds the adaptation on top."""
        if not isinstance(spec, dict) or "config" not in spec:
            raise UserError("model description must be a dict with 'config' and 'tasks'")
        if spec.get("adaptation"):
            raise UserError(f"the model is adapted ({spec['adaptation'].get('strategy')}); rebuild it with "
                             "medexplore.adapt.model_from_spec")
        model = cls(MedformerConfig.from_dict(spec["config"]), [TaskSpec.from_dict(t) for t in spec.get("tasks", [])])
        model.inference = InferenceDefaults.from_dict(spec.get("inference"))
        check_pairs(model.tasks, model.inference.paired_masks)
        return model

    def num_params(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


@functools.lru_cache(maxsize=None)
def _loss_takes_smoothing(head_type: type) -> bool:
    """Whether a head class's ``loss`` has a ``smoothing`` argument (looked up once per class)."""
    return "smoothing" in inspect.signature(head_type.loss).parameters
