"""Defaults that learn: the MedMNIST recipe (``medexplore/configs/medmnist.yaml``) for runs that name
only MedMNIST datasets and give no config file, with a run length derived from the data's size."""
from __future__ import annotations

import copy

from ..configs import load_recipe
from ..data.medmnist import MEDMNIST
from ..data.registry import build_dataset

__all__ = ["uses_medmnist_recipe", "apply_medmnist_recipe"]


def uses_medmnist_recipe(config: dict) -> bool:
    """Whether every dataset of the config's data section is a MedMNIST flag."""
    names = list(config.get("data", {}).get("datasets") or [])
    return bool(names) and all(name in MEDMNIST for name in names)


def apply_medmnist_recipe(config: dict, chosen: dict[str, dict] | None = None) -> tuple[dict, str]:
    """``config`` with the MedMNIST recipe's model and train sections, the user's ``chosen`` values (the
    ``--set`` overrides, by section) kept on top, and ``train.epochs`` derived from the training split's
    size unless chosen. Returns the config and one line saying what was derived."""
    recipe = load_recipe("medmnist")
    chosen = chosen or {}
    config = copy.deepcopy(config)
    train_set = build_dataset(config["data"], "train")
    dims = {MEDMNIST[name].dims for name in config["data"]["datasets"]}
    samples = max(recipe["samples"][f"{d}d"] for d in dims)
    epochs = max(1, round(samples / len(train_set)))
    config["model"] = {**recipe["model"], **chosen.get("model", {})}
    config["train"] = {**recipe["train"], "epochs": epochs, **chosen.get("train", {})}
    note = (f"MedMNIST recipe (medexplore/configs/medmnist.yaml): {config['train']['epochs']} epochs of "
            f"{len(train_set)} training images" + ("" if "epochs" in chosen.get("train", {}) else
                                                  f" (~{samples:,} images seen)"))
    return config, note
