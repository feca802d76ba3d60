"""Defaults that learn: the MedMNIST recipe (``medexplore/configs/medmnist.yaml``) for runs that name
only MedMNIST datasets and give no config file, with a run length and patch sizes derived from the data."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from ..configs import load_recipe, token_budget
from ..data.medmnist import MEDMNIST
from ..data.registry import build_dataset, dataset_parts
from .workflow import checkpoint_architecture

__all__ = ["uses_medmnist_recipe", "apply_medmnist_recipe", "patch_sizes_for"]


def uses_medmnist_recipe(config: dict) -> bool:
    """Whether every dataset of the config's data section is a MedMNIST flag."""
    names = list(config.get("data", {}).get("datasets") or [])
    return bool(names) and all(name in MEDMNIST for name in names)


def patch_sizes_for(shapes: dict[int, tuple[int, ...]], base: int, budget: int) -> dict[int, int]:
    """Per number of spatial dimensions, the patch edge for images of ``shapes[dims]``: the smallest power
    of two from ``base`` up that divides every side and gives at most ``budget`` tokens (when none does,
    the largest power of two that divides every side).

    Example:
        >>> patch_sizes_for({2: (28, 28), 3: (64, 64, 64)}, base=4, budget=512)
        {2: 4, 3: 8}
    """
    chosen = {}
    for dims, shape in shapes.items():
        dividing = [p for p in (2 ** k for k in range(1, 12)) if p >= base and all(s % p == 0 for s in shape)]
        fitting = [p for p in dividing if math.prod(s // p for s in shape) <= budget]
        chosen[dims] = fitting[0] if fitting else (dividing[-1] if dividing else base)
    return chosen


def _token_budget(device: str) -> int:
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return token_budget("cuda" if on_cuda else "cpu")


def _choose_patch_sizes(config: dict, train_set, budget: int, keep_2d: bool) -> str:
    """Set ``model.patch_size`` (unless ``keep_2d``) and ``model.patch_size_3d`` so that the largest image
    of each dimensionality in ``train_set`` stays within ``budget`` tokens; returns the note's words."""
    shapes: dict[int, tuple[int, ...]] = {}
    for part in dataset_parts(train_set):
        spatial = tuple(part[0].image.shape[1:])
        shapes[len(spatial)] = max(shapes.get(len(spatial), spatial), spatial, key=math.prod)
    model = config["model"]
    sizes = patch_sizes_for(shapes, int(model["patch_size"]), budget)
    if keep_2d and 2 in sizes:
        sizes[2] = int(model["patch_size"])
    model["patch_size"] = sizes.get(2, model["patch_size"])
    model["patch_size_3d"] = sizes[3] if sizes.get(3, model["patch_size"]) != model["patch_size"] else None
    return "; patch " + ", ".join(f"{p} for {'x'.join(map(str, shapes[d]))} ({math.prod(s // p for s in shapes[d])} "
                                  f"tokens)" for d, p in sorted(sizes.items())) + f" (token budget {budget})"


def apply_medmnist_recipe(config: dict, chosen: dict[str, dict] | None = None, init: str | Path | None = None
                          ) -> tuple[dict, str]:
    """``config`` with the MedMNIST recipe's model and train sections, the user's ``chosen`` values (the
    ``--set`` overrides, by section) kept on top, ``train.epochs`` derived from the training split's size and
    the patch edge per dimensionality from the recipe's token budget (:func:`patch_sizes_for`), each unless
    chosen. A run that starts from ``init`` (a checkpoint folder or shipped model) keeps that checkpoint's
    architecture and patch sizes instead of the recipe's model section, so fine-tuning a model trained
    before a recipe change still works. Returns the config and one line saying what was derived."""
    recipe = load_recipe("medmnist")
    chosen = chosen or {}
    config = copy.deepcopy(config)
    train_set = build_dataset(config["data"], "train")
    dims = {MEDMNIST[name].dims for name in config["data"]["datasets"]}
    samples = max(recipe["samples"][f"{d}d"] for d in dims)
    epochs = max(1, round(samples / len(train_set)))
    config["model"] = {**(recipe["model"] if init is None else checkpoint_architecture(init)), **chosen.get("model", {})}
    config["train"] = {**recipe["train"], "epochs": epochs, **chosen.get("train", {})}
    note = (f"MedMNIST recipe (medexplore/configs/medmnist.yaml): {config['train']['epochs']} epochs of "
            f"{len(train_set)} training images" + ("" if "epochs" in chosen.get("train", {}) else
                                                  f" (~{samples:,} images seen)"))
    if init is not None:
        note += f"; the architecture of {init}"
    elif "patch_size_3d" not in chosen.get("model", {}):
        note += _choose_patch_sizes(config, train_set, _token_budget(str(config["train"].get("device", "auto"))),
                                    keep_2d="patch_size" in chosen.get("model", {}))
    return config, note
