"""What a model finds in the samples napari ships, with infer_image's default options (what Run does).

- retina with 3 inserted lesions, seeds 0-4 (``--seeds N``: 0 to N-1): lesions found (a box with IoU >= 0.5), lesion Dice, boxes;
- MNI152 T1 with 3 inserted lesions, the same seeds: the same figures in 3D;
- MNI152 T1 (healthy): boxes, share of voxels marked lesion, tissue Dice per class against the template's labels;
- CT slice (healthy): boxes, share of pixels marked lesion;
each with P(lesion) and the wall time of the call.

Usage: python benchmarks/sample_findings.py [MODEL] [--seeds N] [--json OUT]   (MODEL: shipped name or checkpoint folder)
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from medexplore.analysis.inference import infer_image
from medexplore.data.examples import ct_slice, mni152_t1, mni152_with_lesions, retina_with_lesions
from medexplore.models.boxes import box_iou
from medexplore.train.checkpoint import load_model

DEFAULT_MODEL = "medformer-medmnist-embedded-v5"
LESION_SAMPLES = {"retina": retina_with_lesions, "mni152 lesions": mni152_with_lesions}


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    total = pred.sum() + target.sum()
    return float(2 * (pred & target).sum() / total) if total else 1.0


def _run(model, example) -> tuple[dict, object]:
    start = time.perf_counter()
    result = infer_image(model, example.image, example.domain)
    seconds = time.perf_counter() - start
    boxes, scores = result.boxes.get("lesion_boxes", (np.zeros((0, 4)), np.zeros(0)))
    mask = result.segmentations["lesion_mask"].astype(bool)
    row = {"boxes": int(len(boxes)), "lesion_fraction": float(mask.mean()), "p_lesion": float(result.scores["lesion"]),
           "seconds": round(seconds, 2), "windows": result.num_windows, "window": list(result.window)}
    return row, (result, boxes, mask)


def _lesion_row(model, example, seed: int) -> dict:
    row, (_, boxes, mask) = _run(model, example)
    targets = torch.as_tensor(example.boxes)
    iou = box_iou(torch.as_tensor(boxes, dtype=torch.float32), targets) if len(boxes) else torch.zeros(0, len(targets))
    best = iou.max(0).values if len(boxes) else torch.zeros(len(targets))
    row.update(seed=seed, lesions=len(targets), found=int((best >= 0.5).sum()), best_iou=[round(float(b), 2) for b in best],
               dice=_dice(mask, example.labels.astype(bool)))
    return row


def sample_findings(model, seeds: int = 5) -> dict:
    rows = {name: [_lesion_row(model, make(seed), seed) for seed in range(seeds)] for name, make in LESION_SAMPLES.items()}
    example = mni152_t1()
    row, (result, _, _) = _run(model, example)
    tissue = result.segmentations["tissue"]
    row["tissue_dice"] = {name: _dice(tissue == k, example.labels == k) for k, name in enumerate(example.label_names) if k}
    rows["mni152"] = row
    rows["ct"], _ = _run(model, ct_slice())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    parser.add_argument("--seeds", type=int, default=5, help="lesion samples of seeds 0 to N-1 (default 5)")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, _ = load_model(args.model)
    rows = sample_findings(model, args.seeds)
    print(f"model {args.model}; inference defaults {model.inference.to_dict()}")
    print("| sample | found | lesion Dice | boxes | marked lesion | P(lesion) | s |\n|---|---|---|---|---|---|---|")
    for name in LESION_SAMPLES:
        for row in rows[name]:
            print(f"| {name} seed {row['seed']} | {row['found']}/{row['lesions']} (IoU {row['best_iou']}) | {row['dice']:.3f} | "
                  f"{row['boxes']} | {row['lesion_fraction']:.4%} | {row['p_lesion']:.3f} | {row['seconds']} |")
        found, total = (sum(row[k] for row in rows[name]) for k in ("found", "lesions"))
        print(f"| {name}, {args.seeds} seeds | {found}/{total} | {np.mean([row['dice'] for row in rows[name]]):.3f} (mean) "
              f"| {sum(row['boxes'] for row in rows[name])} | | | |")
    for name in ("mni152", "ct"):
        row = rows[name]
        print(f"| {name} (healthy) | - | - | {row['boxes']} | {row['lesion_fraction']:.4%} | {row['p_lesion']:.3f} | {row['seconds']} |")
    print("MNI152 tissue Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in rows["mni152"]["tissue_dice"].items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
