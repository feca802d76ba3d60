"""Pretrained weights by path or name (medexplore checkpoints, timm files, timm names),
:func:`adapt_model`, which loads them and applies an adaptation strategy, and :func:`learn_only`, which
freezes all but named parameters of a plain model."""
from __future__ import annotations

import socket
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..adapt.strategies import AdaptConfig, AdaptReport, apply_strategy
from ..errors import UserError
from ..models.medformer import Medformer
from ..models.timm_weights import load_timm_weights
from .checkpoint import CheckpointError, init_from_checkpoint, resolve_checkpoint

__all__ = ["load_backbone_weights", "read_weights_file", "WeightsError", "adapt_model", "learn_only"]

TIMM_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsError(UserError):
    """Weights that cannot be found, read or fitted; the message names the source."""


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file read with ``weights_only`` (never unpickled).

    A ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    if path.suffix not in TIMM_SUFFIXES:
        raise WeightsError(f"{path}: weights files must end in {', '.join(TIMM_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or pickled objects
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: unreadable weights ({reason})") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return state


def _online(host: str = "huggingface.co") -> bool:
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _timm_by_name(name: str) -> dict[str, torch.Tensor]:
    import timm

    if name not in timm.list_models(pretrained=True) and name.split(".")[0] not in timm.list_models():
        raise WeightsError(f"{name!r} is neither a file nor a timm model name with pretrained weights "
                           "(see timm.list_models(pretrained=True))")
    if not _online():
        raise WeightsError(f"cannot download timm weights {name!r}: no network. Download them elsewhere "
                           "(e.g. timm.create_model(name, pretrained=True) then save its state_dict) "
                           "and pass the file: --weights PATH")
    return timm.create_model(name, pretrained=True).state_dict()


def load_backbone_weights(model: Medformer, source: str | Path) -> str:
    """Load pretrained backbone weights into ``model``; returns what was loaded, in words.

    ``source`` is a medexplore checkpoint folder or shipped model name (tensors whose names and shapes match are copied),
    a timm weights file, or a timm model name (downloaded when online; offline, a clear error asks
    for a file). timm weights are remapped and their positions resampled to the model's grid.
    """
    path = resolve_checkpoint(source)
    if path.is_dir():
        try:
            count = init_from_checkpoint(model, path)
        except CheckpointError as exc:
            raise WeightsError(str(exc)) from exc
        return f"{count} tensors from medexplore checkpoint {path}"
    if path.suffix in TIMM_SUFFIXES or path.exists():
        if not path.exists():
            raise WeightsError(f"{path}: no such weights file")
        state, what = read_weights_file(path), f"timm weights file {path}"
    else:
        state, what = _timm_by_name(str(source)), f"timm weights {source!r}"
    try:
        load_timm_weights(model, state)
    except ValueError as exc:
        raise WeightsError(f"{what}: {exc}") from exc
    return what


def adapt_model(model: Medformer, cfg: AdaptConfig | dict) -> AdaptReport:
    """Load ``cfg.weights`` (if any) into ``model``, build the general expert for ``gmoe``, apply the strategy.

    The general expert has the model's architecture and takes ``cfg.general`` (a medexplore checkpoint,
    e.g. VICReg on :class:`~medexplore.data.natural.NaturalImages`, or timm weights).
    """
    cfg = AdaptConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    cfg.check_sources()
    if cfg.weights:
        load_backbone_weights(model, cfg.weights)
    experts = []
    if cfg.strategy == "gmoe":
        general = Medformer(model.config, [])
        load_backbone_weights(general, cfg.general)
        experts.append(general)
    return apply_strategy(model, cfg, experts)


def learn_only(model: Medformer, prefixes: tuple[str, ...] | list[str]) -> int:
    """Freeze every parameter of ``model`` that none of ``prefixes`` names; returns how many parameters still
    learn. A prefix names whole dotted parts of a name, with or without the trailing dot: ``heads.lesion``
    (or ``heads.lesion.``) is that task's head and not ``heads.lesion_mask``, and
    ``output_adaptformer.queries.lesion`` is one task's latent queries.

    The model stays a plain one (no adaptation is recorded, so its checkpoints load and adapt like any
    other); the largest modules with no learning parameter stay in eval mode under ``model.train()``
    (no stochastic depth in a frozen body).
    """
    names = [name for name, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(_names(p, name) for name in names)]
    if unknown:
        groups = sorted({".".join(n.split(".")[:2]) + "." if n.startswith("heads.") else n.split(".")[0] + "."
                         for n in names})
        raise UserError(f"train.learn: no parameter of the model is or starts with {unknown}; its groups are {groups}")
    for name, param in model.named_parameters():
        param.requires_grad_(any(_names(p, name) for p in prefixes))
    frozen: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f + ".") for f in frozen):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.append(name)
    model.frozen_modules = frozen
    model.train(model.training)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _names(prefix: str, name: str) -> bool:
    """Whether ``prefix`` is ``name`` or its first dotted parts (a trailing dot allowed)."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")
