"""Data loading vs training: samples/s the loader delivers against samples/s a training step consumes.

Both are measured in this run, alternating, for PneumoniaMNIST (28x28, 1 label) and the embedded
multi-annotation data (2D 32x32 + 3D 16^3 with masks and boxes). Target: loader >= 3x the step.

Usage: python benchmarks/bench_data.py [--npz ../shared/data/pneumoniamnist.npz] [--batches 6]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from medexplore.data import MedMNIST, WeightedBatchSampler, collate
from medexplore.data.embedded import EmbeddedDataset
from medexplore.data.registry import dataset_tasks, vocab_for
from medexplore.models import create_model

ROOT = Path(__file__).resolve().parents[1]


def loader_rate(dataset, batch_size: int, batches: int, workers: int) -> float:
    sampler = WeightedBatchSampler(len(dataset), batch_size, num_batches=batches, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    start = time.perf_counter()
    n = sum(b.num_samples for b in loader)
    return n / (time.perf_counter() - start)


def step_rate(dataset, batch_size: int, batches: int) -> float:
    model = create_model("medformer_tiny", tasks=dataset_tasks(dataset), patch_size=4, vocab=vocab_for(dataset)).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    sampler = WeightedBatchSampler(len(dataset), batch_size, num_batches=batches + 1, seed=0)
    loaded = [collate([dataset[i] for i in idx]) for idx in sampler]
    times = []
    for batch in loaded:
        t0 = time.perf_counter()
        opt.zero_grad()
        loss, _ = model.compute_loss(model(batch), batch)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return batch_size / (sum(times[1:]) / len(times[1:]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--npz", default=str(ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"))
    p.add_argument("--batches", type=int, default=6)
    args = p.parse_args()
    cases = {"embedded (multi-annotation 2D+3D)": (EmbeddedDataset("train"), 32)}
    if Path(args.npz).exists():
        cases = {"pneumoniamnist 28x28": (MedMNIST("pneumoniamnist", "train", path=args.npz), 128), **cases}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name, (dataset, bs) in cases.items():
        load0 = loader_rate(dataset, bs, args.batches * 4, 0)
        train = step_rate(dataset, bs, args.batches)
        load0b = loader_rate(dataset, bs, args.batches * 4, 0)
        loader = max(load0, load0b)
        print(f"{name:34s} loader {loader:9.0f} samples/s (main process)  training step {train:7.1f} samples/s  "
              f"ratio {loader / train:6.1f}x (target >= 3)")


if __name__ == "__main__":
    main()
