"""Boxes from a detection head against boxes read off its paired mask's regions, on a split of the model's data.

For every detection task of the model and every two-class mask task labelled on the same images: mAP at
IoU 0.25 / 0.5 / 0.75 and mean IoU of both sources, and the precision, recall and F0.5 each reaches at its
calibrated box threshold (the head's when unpaired; see :mod:`medexplore.models.findings`). The mask's regions
are those of the model's calibrated minimum size.

Usage: python benchmarks/box_sources.py [MODEL] [--split test] [--root DIR]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from medexplore.data.registry import build_dataset
from medexplore.models.findings import mask_regions
from medexplore.models.kinds import kind_entry
from medexplore.models.metrics import detection_metrics
from medexplore.train.calibration import BOX_BETA, box_counts, f_scores, predict_records
from medexplore.train.checkpoint import load_model


@torch.no_grad()
def box_sources(model, dataset, box_task: str, mask_task: str, batch_size: int = 32) -> dict[str, list]:
    """Per source (``head``, ``mask``): (boxes, scores, targets) of each image labelled for ``box_task``, from the
    predictions calibration scores (:func:`medexplore.train.calibration.predict_records`)."""
    model.eval()
    threshold = model.inference.mask_threshold(mask_task)
    found = {"head": [], "mask": []}
    labelled = [i for i in range(len(dataset)) if box_task in dataset[i].labels]
    for start in range(0, len(labelled), batch_size):
        samples = [dataset[i] for i in labelled[start:start + batch_size]]
        for record in predict_records(model, samples, [mask_task], [box_task]):
            boxes, scores = record.boxes[box_task]
            targets = torch.as_tensor(record.labels[box_task], dtype=torch.float32).reshape(-1, boxes.shape[-1])
            foreground = record.foreground[mask_task].numpy()
            min_size = model.inference.region_min_size(mask_task, f"{foreground.ndim}d")
            found["head"].append((boxes, scores, targets))
            found["mask"].append((*mask_regions(foreground, threshold).scored_boxes(0.0, min_size), targets))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="medformer-medmnist-embedded-v5")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--root", help="where the MedMNIST files are (default: the checkpoint's)")
    args = parser.parse_args()
    model, meta = load_model(args.model)
    data = dict(meta["data"], **({"root": args.root} if args.root else {}))
    dataset = build_dataset(data, args.split)
    boxes = [n for n, s in model.tasks.items() if kind_entry(s.kind).output == "boxes"]
    masks = [n for n, s in model.tasks.items() if kind_entry(s.kind).output == "mask" and s.num_outputs == 2]
    print(f"model {args.model}, {args.split} split; inference defaults {model.inference.to_dict()}")
    print("| boxes | source | mAP@0.25 | mAP@0.5 | mAP@0.75 | mean IoU | box threshold | precision | recall | F0.5 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for box_task in boxes:
        for mask_task in masks:
            found = box_sources(model, dataset, box_task, mask_task)
            paired = model.inference.paired_masks.get(box_task) == mask_task
            for source, items in found.items():
                if source == "head" and mask_task != masks[0]:
                    continue
                metrics = detection_metrics([(b, s) for b, s, _ in items], [t for _, _, t in items])
                threshold = model.inference.box_threshold(box_task) if paired == (source == "mask") else None
                row = [f"{metrics[k]:.3f}" for k in ("map@0.25", "map@0.5", "map@0.75", "mean_iou")]
                if threshold is not None:
                    tp, fp, fn = sum(box_counts(b, s, t, thresholds=[threshold])[0] for b, s, t in items)
                    f = f_scores(np.array([[tp, fp, fn]]), BOX_BETA)[0]
                    row += [f"{threshold:.2f}", f"{tp / max(1, tp + fp):.3f}", f"{tp / max(1, tp + fn):.3f}", f"{f:.3f}"]
                else:
                    row += ["-"] * 4
                label = "head" if source == "head" else f"regions of {mask_task}" + (" (used)" if paired else "")
                print(f"| {box_task} | {label} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
