"""Named Medformer sizes: small functions feeding one builder (the timm pattern)."""
from __future__ import annotations

from typing import Callable

from ..errors import UserError
from .config import MedformerConfig
from .medformer import Medformer
from .tasks import TaskSpec

__all__ = ["create_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[[], MedformerConfig]] = {}


def register_model(fn: Callable[[], MedformerConfig]) -> Callable[[], MedformerConfig]:
    _MODELS[fn.__name__] = fn
    return fn


@register_model
def medformer_tiny() -> MedformerConfig:
    return MedformerConfig(embed_dim=192, depth=12, num_heads=3)


@register_model
def medformer_small() -> MedformerConfig:
    return MedformerConfig(embed_dim=384, depth=12, num_heads=6)


@register_model
def medformer_base() -> MedformerConfig:
    return MedformerConfig(embed_dim=768, depth=12, num_heads=12)


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, tasks: list[TaskSpec] = (), **overrides) -> Medformer:
    """Build a named Medformer; any :class:`MedformerConfig` field can be overridden.

    Example:
        >>> create_model("medformer_tiny", depth=2).config.depth
        2
    """
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; available: {list_models()}")
    config = _MODELS[name]().replace(**overrides)
    tasks = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in tasks]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"task names must be unique, got {names}")
    return Medformer(config, tasks)
