"""Channels-last vs PyTorch's default layout for the convolutional parts (stem, segmentation decoders),
as ratios measured in the same run, the two alternated (:func:`medexplore.models.layout.conv_layout`).

1. ``infer_image`` of the shipped model (every task, default options: what napari's Run does) on the
   128^3 volume of ``bench_napari.py`` and on the MNI152 sample;
2. a training step (forward, backward, AdamW) of the same model on 4 crops of 64^3 (lesion mask, tissue,
   lesion boxes and count: its 3D tasks) and of the MedMNIST recipe's model on 32 volumes of 28^3.

Usage: python benchmarks/bench_layout.py [MODEL] [--reps 3] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from medexplore.analysis.inference import infer_image
from medexplore.data.examples import mni152_t1
from medexplore.models import Batch, Domain, create_model
from medexplore.models.layout import conv_layout
from medexplore.train.checkpoint import load_model

LAYOUTS = {"default": False, "channels_last": True}


def _alternate(fn, reps: int) -> dict[str, float]:
    """Median seconds of ``fn`` per layout, the layouts interleaved so that noise hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for rep in range(reps + 1):  # the first round warms up
        for name, flag in LAYOUTS.items():
            with conv_layout(flag):
                start = time.perf_counter()
                fn()
                if rep:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _loss(predictions) -> torch.Tensor:
    """A scalar that reaches every output (a stand-in for the tasks' losses: the layout changes no loss)."""
    if isinstance(predictions, torch.Tensor):
        return predictions.float().pow(2).mean() if predictions.requires_grad else predictions.new_zeros(())
    values = predictions.values() if isinstance(predictions, dict) else predictions
    return sum((_loss(v) for v in values if v is not None), torch.zeros(()))


def _train_step(model, images: list[torch.Tensor], domain: Domain, tasks: list[str]):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = Batch.from_images(images, [domain] * len(images))

    def step():
        optimizer.zero_grad(set_to_none=True)
        _loss(model(batch, tasks=tasks).predictions).backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="medformer-medmnist-embedded-v2")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    brain = Domain("3d", "mri", "brain")
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(1, 128, 128, 128)).astype(np.float32)
    rows = []
    with torch.no_grad():
        for name, image in (("infer_image 128^3", volume), ("infer_image MNI152", mni152_t1().image)):
            rows.append((name, _alternate(lambda: infer_image(model, image, brain), args.reps)))
    tasks_3d = [n for n, s in model.tasks.items() if s.applies_to(brain)]
    crops = [torch.from_numpy(rng.normal(size=(1, 64, 64, 64)).astype(np.float32)) for _ in range(4)]
    rows.append(("train step, 4 x 64^3, " + ", ".join(tasks_3d),
                 _alternate(_train_step(model.train(), crops, brain, tasks_3d), args.reps)))
    torch.manual_seed(0)
    recipe = create_model("medformer_tiny", tasks=[{"name": "adrenal", "kind": "binary", "num_outputs": 1,
                                                    "dimensionalities": ["3d"]}],
                          patch_size=4, stem="conv", stem_norm="instance", layer_scale=0.1, depth=6,
                          embed_dim=128, num_heads=4).train()
    small = [torch.from_numpy(rng.normal(size=(1, 28, 28, 28)).astype(np.float32)) for _ in range(32)]
    rows.append(("train step, 32 x 28^3, recipe model", _alternate(
        _train_step(recipe, small, Domain("3d", "ct", "adrenal"), ["adrenal"]), args.reps)))
    print(f"threads {torch.get_num_threads()}, {args.reps} reps, median seconds")
    print("| case | default layout | channels-last | speed-up |")
    print("|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t['default']:.2f} | {t['channels_last']:.2f} | {t['default'] / t['channels_last']:.2f}x |")


if __name__ == "__main__":
    main()
