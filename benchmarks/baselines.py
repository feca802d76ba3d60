"""ResNet-18 baselines trained beside Medformer on the same MedMNIST files (not medexplore models).

2D: torchvision ``resnet18`` in the MedMNIST v2 28-px variant (first convolution 3x3, stride 1, no
max-pool), input channels as the dataset has them. 3D: torchvision ``r3d_18`` with a one-channel stem
(its (3, 7, 7) stem, stride (1, 2, 2), as torchvision builds it; MedMNIST's own 3D ResNet-18 keeps full
resolution and costs ~5x more, which a 2-core CPU cannot train in the budget).

Recipe (MedMNIST v2's, shortened to a CPU budget): Adam lr 1e-3, batch 128, lr x0.1 at 50% and 75% of
the epochs; the epochs are derived from the dataset's size so that every run sees the same number of
training images (``SAMPLES``: 32,000 in 2D, 8,000 in 3D, about 15 and 25 min on 2 CPU cores), no
augmentation, cross-entropy (binary tasks as two classes, as in the paper); the epoch
with the best validation AUC is scored on the test split, with the MedMNIST evaluator's AUC / ACC
(the same functions medexplore reports with).

Usage: python benchmarks/baselines.py --root ../shared/data/medmnist --dataset breastmnist --seed 0
       --out runs/baselines
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medexplore.data.medmnist import MEDMNIST, MedMNIST
from medexplore.models.metrics import classification_metrics


def resnet18_2d(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision ResNet-18, MedMNIST 28-px variant: 3x3 stride-1 stem, no max-pool."""
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def resnet18_3d(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision ``r3d_18`` with an ``in_channels`` stem (same kernel and stride as torchvision's)."""
    from torchvision.models.video import r3d_18

    net = r3d_18(num_classes=num_classes)
    net.stem[0] = nn.Conv3d(in_channels, 64, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
    return net


SAMPLES = {2: 32_000, 3: 8_000}  # training images seen per run, by dimensionality


def epochs_for(flag: str, train_size: int) -> int:
    """Epochs that show ``SAMPLES`` training images of ``flag``'s dimensionality (at least one)."""
    return max(1, round(SAMPLES[MEDMNIST[flag].dims] / train_size))


def build_baseline(flag: str) -> nn.Module:
    info = MEDMNIST[flag]
    classes = max(2, len(info.labels))
    return (resnet18_2d if info.dims == 2 else resnet18_3d)(info.channels, classes)


@torch.no_grad()
def scores(net: nn.Module, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    net.eval()
    return torch.cat([net(images[i:i + batch]).softmax(-1) for i in range(0, len(images), batch)]).numpy()


def evaluate(net: nn.Module, data: MedMNIST) -> dict:
    probs = scores(net, data.images)
    labels = data.labels[:, 0].numpy()
    kind = data.info.kind
    if kind == "binary":  # the positive-class score, as medexplore's binary head gives it
        return classification_metrics("binary", labels, probs[:, 1])
    return classification_metrics(kind, labels, probs)


def train_baseline(flag: str, root: str | Path, seed: int, batch_size: int = 128, lr: float = 1e-3,
                   log=print) -> dict:
    """Train one baseline; returns its test metrics, best epoch, wall and CPU seconds, and parameters."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    splits = {s: MedMNIST(flag, s, root=root, download=False) for s in ("train", "val", "test")}
    epochs = epochs_for(flag, len(splits["train"]))
    net = build_baseline(flag)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    milestones = [max(1, round(epochs * 0.5)), max(1, round(epochs * 0.75))]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    x, y = splits["train"].images, splits["train"].labels[:, 0]
    g = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = -1.0, None, 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        val = evaluate(net, splits["val"])
        if val["auc"] > best:
            best, best_state, best_epoch = val["auc"], copy.deepcopy(net.state_dict()), epoch
        log(f"{flag} seed {seed} epoch {epoch}/{epochs}: val AUC {val['auc']:.3f} ACC {val['acc']:.3f} "
            f"({time.perf_counter() - wall0:.0f} s)")
    net.load_state_dict(best_state)
    test = evaluate(net, splits["test"])
    return {"dataset": flag, "seed": seed, "epochs": epochs, "best_epoch": best_epoch, "val_auc": best,
            "samples": SAMPLES[splits["train"].info.dims], "test": test, "wall_s": time.perf_counter() - wall0,
            "cpu_s": time.process_time() - cpu0,
            "params": sum(p.numel() for p in net.parameters()), "threads": torch.get_num_threads()}


def _record(flag: str, seed: int, out: str | Path) -> Path:
    return Path(out) / f"resnet18-{flag}-seed{seed}-s{SAMPLES[MEDMNIST[flag].dims]}.json"


def cached(flag: str, seed: int, out: str | Path) -> dict | None:
    """The finished run's result kept in ``out``, or None."""
    path = _record(flag, seed, out)
    return json.loads(path.read_text()) if path.exists() else None


def run_cached(flag: str, root, seed: int, out: str | Path, log=print) -> dict:
    """``train_baseline`` once per (dataset, seed, budget): the result is kept in ``out`` as JSON."""
    path = _record(flag, seed, out)
    if path.exists():
        return json.loads(path.read_text())
    result = train_baseline(flag, root, seed, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float))
    tmp.replace(path)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="../shared/data/medmnist")
    p.add_argument("--dataset", nargs="+", required=True, choices=sorted(MEDMNIST))
    p.add_argument("--seed", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="runs/baselines")
    args = p.parse_args()
    for seed in args.seed:
        for flag in args.dataset:
            r = run_cached(flag, args.root, seed, args.out)
            print(f"{flag} seed {seed}: test AUC {r['test']['auc']:.3f} ACC {r['test']['acc']:.3f} "
                  f"(best epoch {r['best_epoch']}, {r['wall_s'] / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
