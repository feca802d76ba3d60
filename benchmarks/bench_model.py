"""Medformer performance, as ratios against references measured in the same run.

1. Training-step throughput of medformer_tiny vs a timm VisionTransformer of the same width, depth
   and heads (2D 28x28, patch 4, fp32), the two alternated.
2. Packed (grouped) vs padded forward+backward on a mixed batch (half 2D 28x28, half 3D 28^3),
   plus 2D-only and 3D-only batches; the ceiling is padded tokens / real tokens.
4. A batch whose every sample has its own shape vs one shape with about the same tokens (time per
   token); on CUDA also varlen attention vs one dense call per segment.
3. Achieved GFLOP/s of the training step (torch.utils.flop_counter) vs the fp32 matmul peak.

Usage: python benchmarks/bench_model.py [--batch 128] [--mixed-batch 32] [--reps 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time
from unittest import mock

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from medexplore.models import Batch, Domain, TaskSpec, create_model
from medexplore.models.packing import TokenLayout


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(contenders: dict, reps: int, device) -> dict[str, float]:
    """Median seconds per call of each contender, calls interleaved so noise hits both alike."""
    for fn in contenders.values():  # warm-up
        fn()
    times = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(device, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def train_step_fn(model, optimizer, forward_loss):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss()
        loss.backward()
        optimizer.step()
    return step


def attention_flop_formulas() -> dict:
    """FLOP formulas for the CPU flash-attention kernels, which torch's counter does not know (it counts 0)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_backward_flop_count(grad, q, k, v)}


def bench_vs_timm(args, device):
    torch.manual_seed(0)
    images = torch.randn(args.batch, 1, 28, 28, device=device)
    labels = torch.randint(0, 2, (args.batch,), device=device)
    domain = Domain("2d", "xray", "chest")
    med = create_model("medformer_tiny", tasks=[TaskSpec("label", "binary", 1)], patch_size=4).to(device).train()
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=12, num_heads=3, num_classes=2).to(device).train()
    batch = Batch.from_images(images, domain, {"label": labels.tolist()}).to(device)

    def med_loss():
        return med.compute_loss(med(batch), batch)[0]

    def vit_loss():
        return torch.nn.functional.cross_entropy(vit(images), labels)

    med_step = train_step_fn(med, torch.optim.AdamW(med.parameters(), 1e-4), med_loss)
    vit_step = train_step_fn(vit, torch.optim.AdamW(vit.parameters(), 1e-4), vit_loss)
    t = alternate({"medformer": med_step, "timm": vit_step}, args.reps, device)
    with FlopCounterMode(display=False, custom_mapping=attention_flop_formulas()) as counter:
        med_loss().backward()
    flops = counter.get_total_flops()
    return t, flops


def mixed_batch(n2d: int, n3d: int, device) -> Batch:
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 28, 28, generator=g) for _ in range(n2d)] + \
             [torch.randn(1, 28, 28, 28, generator=g) for _ in range(n3d)]
    domains = [Domain("2d", "xray", "chest")] * n2d + [Domain("3d", "ct", "chest")] * n3d
    labels = torch.randint(0, 2, (n2d + n3d,), generator=g).tolist()
    return Batch.from_images(images, domains, {"label": labels}).to(device)


def bench_packing(args, device):
    torch.manual_seed(0)
    model = create_model("medformer_tiny", tasks=[TaskSpec("label", "binary", 1)], patch_size=4).to(device).train()
    half = args.mixed_batch // 2
    cases = {"mixed": (half, half), "2d-only": (args.mixed_batch, 0), "3d-only": (0, args.mixed_batch)}
    rows = []
    for name, (n2d, n3d) in cases.items():
        batch = mixed_batch(n2d, n3d, device)

        def run(mode):
            def fn():
                model.zero_grad(set_to_none=True)
                out = model(batch, packing=mode)
                model.compute_loss(out, batch)[0].backward()
            return fn

        with torch.no_grad():
            model.eval()
            diff = (model(batch, packing="grouped").embedding - model(batch, packing="padded").embedding).abs().max().item()
            model.train()
        t = alternate({"grouped": run("grouped"), "padded": run("padded")}, args.reps, device)
        real = n2d * 49 + n3d * 343
        padded = (n2d + n3d) * (343 if n3d else 49)
        ceiling = padded / real
        speedup = t["padded"] / t["grouped"]
        rows.append((name, t["grouped"], t["padded"], speedup, ceiling, speedup / ceiling if ceiling > 1 else float("nan"), diff))
    return rows


def bench_shapes(args, device, depth: int = 2) -> dict:
    """Every sample its own shape (small grids, 4-49 tokens) against one shape with the same total tokens."""
    torch.manual_seed(0)
    model = create_model("medformer_tiny", tasks=[TaskSpec("label", "binary", 1)], patch_size=4,
                         depth=depth).to(device).train()
    g = torch.Generator().manual_seed(0)
    grids = [(h, w) for h in range(2, 8) for w in range(2, 8)][:args.mixed_batch]  # all different
    total = sum(h * w for h, w in grids)
    side = max(2, round((total / len(grids)) ** 0.5))
    same = [(side, round(total / len(grids) / side))] * len(grids)
    batches = {}
    for name, shapes in (("all-different", grids), ("same-shape", same)):
        images = [torch.randn(1, 4 * h, 4 * w, generator=g) for h, w in shapes]
        labels = torch.randint(0, 2, (len(images),), generator=g).tolist()
        batches[name] = Batch.from_images(images, Domain("2d", "xray", "chest"), {"label": labels}).to(device)

    def run(batch):
        def fn():
            model.zero_grad(set_to_none=True)
            model.compute_loss(model(batch), batch)[0].backward()
        return fn

    contenders = {name: run(b) for name, b in batches.items()}
    if device.type == "cuda":  # the same batch with one dense attention call per segment instead of varlen
        per_segment = functools.partialmethod(TokenLayout.self_attention, varlen=False)
        def dense_segments():
            with mock.patch.object(TokenLayout, "self_attention", per_segment):
                contenders["all-different"]()
        contenders["all-different, per-segment attention"] = dense_segments
    t = alternate(contenders, args.reps, device)
    tokens = {name: sum(_grid_tokens(img.shape[2:]) * img.shape[0] for img in b.groups) for name, b in batches.items()}
    calls = {name: len(model.layout(b).segments) for name, b in batches.items()}
    for extra in set(t) - set(batches):
        tokens[extra], calls[extra] = tokens["all-different"], calls["all-different"]
    return {"times": t, "tokens": tokens, "segments": calls}


def _grid_tokens(shape) -> int:
    n = 1
    for s in shape:
        n *= s // 4
    return n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mixed-batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only-shapes", action="store_true", help="run case [4] alone")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, timm {timm.__version__}")

    if args.only_shapes:
        shapes = bench_shapes(args, device)
        t = shapes["times"]
        per_token = (t["all-different"] / shapes["tokens"]["all-different"]) / (t["same-shape"] / shapes["tokens"]["same-shape"])
        print({k: round(v, 4) for k, v in t.items()}, shapes["tokens"], shapes["segments"],
              f"time per token all-different / same-shape {per_token:.2f}")
        if "all-different, per-segment attention" in t:
            print(f"varlen vs per-segment attention: {t['all-different, per-segment attention'] / t['all-different']:.2f}x")
        return
    peak = matmul_peak(device)
    t, flops = bench_vs_timm(args, device)
    ratio = t["timm"] / t["medformer"]
    print(f"\n[1] training step, batch {args.batch} x 28x28 patch 4 (49 tokens), fp32")
    print(f"    medformer_tiny {args.batch / t['medformer']:8.1f} samples/s   timm ViT {args.batch / t['timm']:8.1f} samples/s")
    print(f"    throughput ratio medformer/timm = {ratio:.3f}   (target >= 0.85)")
    achieved = flops / t["medformer"] / 1e9
    print(f"\n[3] medformer step {flops / 1e9:.1f} GFLOP -> {achieved:.1f} GFLOP/s; fp32 matmul peak {peak:.1f} GFLOP/s "
          f"-> {achieved / peak:.2f} of peak")

    print(f"\n[2] packed (grouped) vs padded forward+backward, batch {args.mixed_batch}")
    print(f"    {'case':8s} {'grouped s':>10s} {'padded s':>10s} {'speedup':>8s} {'ceiling':>8s} {'of ceil':>8s} {'max|diff|':>10s}")
    for name, tg, tp, sp, ceil, frac, diff in bench_packing(args, device):
        print(f"    {name:8s} {tg:10.3f} {tp:10.3f} {sp:8.2f} {ceil:8.2f} {frac:8.2f} {diff:10.2e}")

    shapes = bench_shapes(args, device)
    t = shapes["times"]
    print(f"\n[4] {args.mixed_batch} samples of {args.mixed_batch} different shapes vs one shape, depth 2, fwd+bwd")
    for name in t:
        print(f"    {name:14s} {t[name]:8.4f} s  {shapes['tokens'][name]:5d} tokens  "
              f"{shapes['segments'][name]:3d} attention segment(s)")
    per_token = (t["all-different"] / shapes["tokens"]["all-different"]) / (t["same-shape"] / shapes["tokens"]["same-shape"])
    print(f"    time per token, all-different / same-shape = {per_token:.2f}   (target <= 1.2)")
    if "all-different, per-segment attention" in t:
        print(f"    varlen attention speed-up over one call per segment: "
              f"{t['all-different, per-segment attention'] / t['all-different']:.2f}x")


if __name__ == "__main__":
    main()
