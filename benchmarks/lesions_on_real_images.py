"""Synthetic-lesion findings the shipped models report on real MedMNIST test images, which hold none.

The embedded tasks (``lesion``, ``lesion_boxes``, ``lesion_mask``) learn synthetic lesions inserted into the
embedded crops; no MedMNIST image carries them, so every box or lesion voxel on one is a false alarm of those
tasks (the images' own findings, a tumour or an enlarged gland, are not what the tasks were taught). Per file
and model: images with at least one box, boxes, the mean share of voxels marked lesion, the mean P(lesion) of
the presence head and the mean count of the count head (``lesion``, ``lesion_count``), by ``infer_image`` with
the model's defaults, over the first ``--per-file`` test images.

Usage: python benchmarks/lesions_on_real_images.py [MODEL ...] [--root DIR] [--per-file 60]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from medexplore.analysis.inference import infer_image
from medexplore.data.medmnist import MEDMNIST
from medexplore.train.checkpoint import load_model

DEFAULT_MODELS = ("medformer-medmnist-embedded-v4", "medformer-medmnist-embedded-v5")


def channels_first(image: np.ndarray, dims: int) -> np.ndarray:
    """A MedMNIST array (H, W[, 3]) or (D, H, W) as (C, *spatial) float32."""
    image = image.astype(np.float32)
    return np.moveaxis(image, -1, 0) if image.ndim == dims + 1 else image[None]


def false_findings(model, images: np.ndarray, domain, dims: int) -> dict[str, float]:
    with_box = boxes = 0
    shares, scores = [], {"lesion": [], "lesion_count": []}
    for image in images:
        result = infer_image(model, channels_first(image, dims), domain)
        found = sum(len(b) for b, _ in result.boxes.values())
        with_box, boxes = with_box + (found > 0), boxes + found
        mask = result.segmentations.get("lesion_mask")
        shares.append(0.0 if mask is None else float((mask > 0).mean()))
        for task, values in scores.items():
            values.extend(np.asarray(result.scores.get(task, [np.nan]), dtype=float).reshape(-1)[:1])
    return {"images with a box": with_box / len(images), "boxes per image": boxes / len(images),
            "lesion voxels %": 100 * float(np.mean(shares)), "P(lesion)": float(np.mean(scores["lesion"])),
            "lesion count": float(np.mean(scores["lesion_count"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--root", default=os.environ.get("MEDMNIST_ROOT", "../shared/data/medmnist"))
    parser.add_argument("--per-file", type=int, default=60)
    args = parser.parse_args()
    models = {name: load_model(name)[0].eval() for name in args.models}
    files = sorted(Path(args.root).glob("*.npz"))
    if not files:
        raise SystemExit(f"no MedMNIST .npz files in {args.root}")
    print("| file | model | images with a box | boxes per image | lesion voxels % | P(lesion) | lesion count |")
    print("|---|---|---|---|---|---|---|")
    for path in files:
        flag = path.stem.split("_")[0]
        if flag not in MEDMNIST:
            continue
        info = MEDMNIST[flag]
        with np.load(path) as data:
            images = data["test_images"][:args.per_file]
        for name, model in models.items():
            row = false_findings(model, images, info.domain, info.dims)
            print(f"| {path.stem} | {name} | {row['images with a box']:.0%} | {row['boxes per image']:.2f} | "
                  f"{row['lesion voxels %']:.2f} | {row['P(lesion)']:.2f} | {row['lesion count']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
