"""Recipes as data: the YAML files beside this module, and the one reader of run configs and
``--set SECTION.KEY=VALUE`` overrides that the CLI, the widgets and the experiments share.

- ``defaults``: what every run config starts from (sections model, data, train, adapt)
- ``experiments``: the claim experiments' recipes per budget
- ``demo``, ``example``: the demo's and the notebooks' example model
- ``adapt_bench``: the adaptation benchmark's training recipe
- ``model_sizes``: the training widget's model choices
"""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import yaml

from ..errors import UserError

__all__ = ["RECIPE_NAMES", "load_recipe", "token_budget", "parse_value", "parse_overrides", "load_config"]

FOLDER = Path(__file__).resolve().parent
RECIPE_NAMES = tuple(sorted(p.stem for p in FOLDER.glob("*.yaml")))


@lru_cache(maxsize=None)
def _read(name: str) -> dict:
    return yaml.safe_load((FOLDER / f"{name}.yaml").read_text())


def load_recipe(name: str) -> dict:
    """A fresh copy of the recipe ``name`` (one of :data:`RECIPE_NAMES`)."""
    if name not in RECIPE_NAMES:
        raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPE_NAMES)}")
    return copy.deepcopy(_read(name))


def token_budget(device: str) -> int:
    """Tokens per sample at most on ``device`` (``cpu``, ``cuda:0``, ...): the budget from which training
    recipes choose patch sizes and inference chooses its sliding windows (``tokens`` of the MedMNIST recipe)."""
    tokens = _read("medmnist")["tokens"]
    return int(tokens["cuda" if str(device).startswith("cuda") else "cpu"])


def parse_value(text: str):
    """A ``--set`` value as YAML reads it (``3e-4``, ``[a, b]``, ``true``), else the text itself."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items: Iterable[str], sections: Iterable[str], flag: str = "--set", section: str | None = None
                    ) -> dict[str, dict]:
    """``["train.lr=1e-3", ...]`` as ``{"train": {"lr": 0.001}}``; sections outside ``sections`` are refused.
    With ``section``, items are ``KEY=VALUE`` of that one section (e.g. ``--model depth=2``)."""
    sections = sorted(sections)
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section_name, dot, name = (section, ".", key) if section else key.partition(".")
        if not (sep and dot and section_name and name):
            form = "KEY=VALUE" if section else f"SECTION.KEY=VALUE ({', '.join(sections)})"
            raise UserError(f"{flag} expects {form}, got {item!r}")
        if section_name not in sections:
            raise UserError(f"{flag} {item!r}: unknown section {section_name!r}; expected {sections}")
        out.setdefault(section_name, {})[name] = parse_value(value)
    return out


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> dict:
    """The ``defaults`` recipe, then the YAML file at ``path``, then ``--set section.key=value`` overrides."""
    config = load_recipe("defaults")
    if path:
        p = Path(path)
        if not p.exists():
            raise UserError(f"config file {p} not found")
        if p.is_dir():
            raise UserError(f"config file {p} is a directory; give a YAML file (see configs/)")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {p}: invalid YAML: {' '.join(str(exc).split())}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {p}: unreadable: {exc}") from exc
        if not isinstance(loaded, dict):
            raise UserError(f"config file {p}: expected sections {sorted(config)}, got a {type(loaded).__name__}")
        unknown = set(loaded) - set(config)
        if unknown:
            raise UserError(f"config file {p}: unknown section(s) {sorted(unknown)}; expected {sorted(config)}")
        for section, values in loaded.items():
            if values is not None and not isinstance(values, dict):
                raise UserError(f"config file {p}: section {section!r} must be a mapping, got {values!r}")
            config[section].update(values or {})
    for section, values in parse_overrides(overrides, config).items():
        config[section].update(values)
    return config
