"""Models that ship with medexplore, by name.

Each is a checkpoint folder beside this module (``meta.json`` and ``model.safetensors``, no training state)
with its model card (``MODEL_CARD.md``: data, recipe, the command that reproduces it, test metrics, failure
cases, licence). Everything that takes a checkpoint folder also takes one of these names
(:func:`medexplore.train.checkpoint.resolve_checkpoint`); ``medexplore models`` lists them.

Example:
    >>> "medformer-medmnist5-v1" in pretrained_models()
    True
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["FOLDER", "PretrainedModel", "pretrained_models", "pretrained_folder"]

FOLDER = Path(__file__).resolve().parent
CARD = "MODEL_CARD.md"


@dataclass(frozen=True)
class PretrainedModel:
    """One shipped checkpoint: its name (``<model>-<data>-v<version>``), folder and card."""

    name: str
    folder: Path

    @property
    def card(self) -> Path:
        return self.folder / CARD

    @property
    def summary(self) -> str:
        """The card's title line, without its ``#`` and the name."""
        title = self.card.read_text().splitlines()[0].lstrip("# ").strip()
        return title.removeprefix(f"{self.name}:").strip()

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    @property
    def tasks(self) -> list[str]:
        return [task["name"] for task in json.loads((self.folder / "meta.json").read_text())["model"]["tasks"]]


def _newest_first(folder: Path) -> tuple[str, int]:
    """Sort key: by name, each model's versions newest first (``-v3`` before ``-v2``)."""
    family, _, version = folder.name.rpartition("-v")
    return (family, -int(version)) if family and version.isdigit() else (folder.name, 0)


@lru_cache(maxsize=None)
def _scan() -> tuple[PretrainedModel, ...]:
    folders = sorted((p for p in FOLDER.iterdir() if (p / "meta.json").is_file() and (p / CARD).is_file()),
                     key=_newest_first)
    return tuple(PretrainedModel(p.name, p) for p in folders)


def pretrained_models() -> dict[str, PretrainedModel]:
    """Every shipped model by name, each model's versions newest first (the order pickers list them in)."""
    return {model.name: model for model in _scan()}


def pretrained_folder(name: str) -> Path | None:
    """The folder of the shipped model ``name``, or None when no shipped model has that name."""
    model = pretrained_models().get(str(name))
    return None if model is None else model.folder
