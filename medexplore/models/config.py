"""Medformer configuration and the domain vocabulary, both plain JSON-serialisable records."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import UserError
from .tasks import DIMENSIONALITIES, Domain
from .tokenizer import STEM_NORMS, STEMS

__all__ = ["DomainVocab", "MedformerConfig", "UNKNOWN"]

UNKNOWN = "unknown"
POS_EMBED_CHOICES = ("rope", "learned", "rope+learned", "none")


@dataclass(frozen=True)
class DomainVocab:
    """The modalities and body parts a model has latents for; index 0 of each is ``unknown``.

    Example:
        >>> v = DomainVocab(modalities=("xray", "mri"))
        >>> v.modality_index("mri"), v.modality_index("pet")
        (2, 0)
    """

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()

    def __post_init__(self):
        for attr in ("modalities", "body_parts"):
            values = tuple(v for v in getattr(self, attr) if v != UNKNOWN)
            if len(set(values)) != len(values):
                raise UserError(f"DomainVocab.{attr} has duplicates: {values}")
            object.__setattr__(self, attr, values)

    @property
    def num_modalities(self) -> int:
        return len(self.modalities) + 1

    @property
    def num_body_parts(self) -> int:
        return len(self.body_parts) + 1

    def modality_index(self, name: str) -> int:
        return self.modalities.index(name) + 1 if name in self.modalities else 0

    def body_part_index(self, name: str) -> int:
        return self.body_parts.index(name) + 1 if name in self.body_parts else 0

    def encode(self, domain: Domain) -> tuple[int, int, int]:
        """(dimensionality, modality, body part) indices; unknown values map to 0."""
        return (
            DIMENSIONALITIES.index(domain.dimensionality),
            self.modality_index(domain.modality),
            self.body_part_index(domain.body_part),
        )

    def extended(self, modalities=(), body_parts=()) -> "DomainVocab":
        """A vocabulary with new names appended; existing indices do not move."""
        return DomainVocab(
            self.modalities + tuple(m for m in dict.fromkeys(modalities) if m not in self.modalities and m != UNKNOWN),
            self.body_parts + tuple(b for b in dict.fromkeys(body_parts) if b not in self.body_parts and b != UNKNOWN),
        )


@dataclass(frozen=True)
class MedformerConfig:
    """Every architectural choice of a Medformer. Named sizes live in :mod:`medexplore.models.registry`.

    Args:
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the timm ViT body.
        patch_size: patch edge in pixels (2D), and in voxels (3D) unless ``patch_size_3d`` is set.
        patch_size_3d: patch edge in voxels for volumes (None: ``patch_size``), e.g. 8 for 64^3
            volumes (512 tokens) beside 2D images at patch 4.
        stem: ``patch`` (linear patch embedding, loads timm weights) or ``conv`` (a few stride-2
            convolutions per dimensionality before the projection; patch size a power of 2).
        stem_norm: normalisation in the ``conv`` stem: ``group``, ``instance`` (per channel and image)
            or ``batch`` (see :class:`~medexplore.models.tokenizer.ConvStem`).
        in_chans: channels the model is built for; single-channel images are always accepted
            (treated as grey, i.e. the channel replicated).
        pos_embed: ``rope`` (3D rotary on queries/keys), ``learned`` (absolute, timm style),
            ``rope+learned`` or ``none``.
        pos_grid: (z, y, x) grid of the learned absolute positions.
        rope_theta: rotary base frequency.
        class_token: prepend a class token (timm parity); otherwise tokens are mean-pooled.
        input_adaptformer: cross-attention of tokens to domain latents after patch embedding.
        domain_latents: latents per attribute value (dimensionality, modality, body part).
        output_adaptformer: task latent queries read the tokens; off, heads read the pooled token.
        seg_channels: base width of the segmentation decoder.
        seg_full_channels: width of the decoder's full-resolution stage (its image stem, last fusion and
            head: the costliest convolutions); None: ``seg_channels``.
        drop_path_rate: stochastic depth of the body.
        layer_scale: initial value of a learnable per-channel scale on every block's residual branches
            (timm's ``init_values``, e.g. 0.1); None: no scale.
        vocab: the domain vocabulary.
    """

    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_size: int = 16
    patch_size_3d: int | None = None
    stem: str = "patch"
    stem_norm: str = "group"
    in_chans: int = 3
    pos_embed: str = "rope"
    pos_grid: tuple[int, int, int] = (1, 14, 14)
    rope_theta: float = 100.0
    class_token: bool = False
    input_adaptformer: bool = True
    domain_latents: int = 4
    output_adaptformer: bool = True
    seg_channels: int = 32
    seg_full_channels: int | None = None
    drop_path_rate: float = 0.0
    layer_scale: float | None = None
    vocab: DomainVocab = field(default_factory=DomainVocab)

    def __post_init__(self):
        if isinstance(self.vocab, dict):
            object.__setattr__(self, "vocab", DomainVocab(**self.vocab))
        object.__setattr__(self, "pos_grid", tuple(self.pos_grid))
        positive = ("embed_dim", "depth", "num_heads", "patch_size", "in_chans", "domain_latents", "seg_channels")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"MedformerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seg_full_channels is not None and self.seg_full_channels < 1:
            raise UserError(f"MedformerConfig.seg_full_channels must be >= 1 (or null), got {self.seg_full_channels}")
        if self.embed_dim % self.num_heads:
            raise UserError(f"MedformerConfig: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.stem not in STEMS:
            raise UserError(f"MedformerConfig.stem must be one of {STEMS}, got {self.stem!r}")
        if self.stem_norm not in STEM_NORMS:
            raise UserError(f"MedformerConfig.stem_norm must be one of {STEM_NORMS}, got {self.stem_norm!r}")
        if self.layer_scale is not None and not self.layer_scale > 0:
            raise UserError(f"MedformerConfig.layer_scale must be > 0 (or null: no scale), got {self.layer_scale}")
        if self.patch_size_3d is not None and self.patch_size_3d < 1:
            raise UserError(f"MedformerConfig.patch_size_3d must be >= 1 (or null: patch_size), got {self.patch_size_3d}")
        for p in set(self.patch_sizes.values()):
            if self.stem == "conv" and (p < 2 or p & (p - 1)):
                raise UserError(f"MedformerConfig: stem 'conv' needs a patch size that is a power of 2, got {p}")
        if self.pos_embed not in POS_EMBED_CHOICES:
            raise UserError(f"MedformerConfig.pos_embed must be one of {POS_EMBED_CHOICES}, got {self.pos_embed!r}")
        if "rope" in self.pos_embed and self.head_dim < 6:
            raise UserError(f"MedformerConfig: rotary positions need head_dim >= 6, got {self.head_dim}")
        if len(self.pos_grid) != 3 or min(self.pos_grid) < 1:
            raise UserError(f"MedformerConfig.pos_grid must be three positive ints (z, y, x), got {self.pos_grid}")
        if not self.mlp_ratio > 0:
            raise UserError(f"MedformerConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise UserError(f"MedformerConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def patch_sizes(self) -> dict[int, int]:
        """Patch edge per number of spatial dimensions: ``{2: patch_size, 3: patch_size_3d or patch_size}``."""
        return {2: self.patch_size, 3: self.patch_size_3d or self.patch_size}

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token)

    def replace(self, **overrides) -> "MedformerConfig":
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise UserError(f"MedformerConfig: unknown option(s) {sorted(unknown)}")
        return replace(self, **overrides)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pos_grid"] = list(self.pos_grid)
        d["vocab"] = {k: list(v) for k, v in d["vocab"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MedformerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"MedformerConfig: unknown field(s) {sorted(unknown)} (checkpoint from another version?)")
        return cls(**d)
