"""The GPU path in one script: what a person runs once on a CUDA machine (about 8 minutes on one GPU).

Steps (each timed; one that fails is reported and the next one runs):

- ``tests``: the test suite's CUDA tests (``pytest -k cuda`` on the test modules that ask
  ``torch.cuda.is_available()``: packed against alone on CUDA, varlen attention, the CUDA default model
  against each sample alone). Only those modules are collected, so the GUI and notebook extras need not
  be installed on the GPU machine.
- ``throughput``: one training step of ``medformer_base`` (224x224 RGB, patch 16: 196 tokens) in bf16
  autocast against timm's ViT-B/16 (SDPA attention) on the same batch, alternated; model FLOPs
  utilisation against the bf16 matmul peak measured in the same run.
- ``varlen``: a batch of all-different shapes against one shape (time per token), and varlen attention
  (nested jagged SDPA) against one dense call per segment (``benchmarks/bench_model.py`` case 4).
- ``compile``: ``torch.compile`` on and off, medformer_tiny training step (first call = compile time).
- ``torchrun``: ``torchrun --nproc_per_node 1`` (NCCL) trains 2 epochs; the same run killed (SIGKILL)
  after its first epoch and continued with ``--resume`` must end with bitwise-identical weights.
- ``inference``: ``infer_image`` to every overlay (classification, count, boxes, segmentation) on a
  128^3 volume with a model of the embedded tasks.

It prints one summary table and writes it as JSON (``--out``). ``--dry-run`` checks the arguments,
the imports and the device, lists the steps and stops (CI runs it on CPU so the script cannot rot);
``--device cpu --quick`` runs every step at toy sizes (a check of the script itself, not a benchmark).

Usage: python benchmarks/gpu_check.py [--out gpu_check.json] [--steps tests throughput ...] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import bench_model
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "throughput", "varlen", "compile", "torchrun", "inference")


def check_tests(args, device) -> dict:
    modules = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                     if "cuda.is_available()" in f.read_text())
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *modules, "-k", "cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    out = {"ok": proc.returncode in (0, 5), "modules": " ".join(modules), "summary": summary}  # 5: none selected
    if not out["ok"]:
        out["output"] = proc.stdout[-3000:] + proc.stderr[-1000:]
    return out


def check_throughput(args, device) -> dict:
    import timm

    from medexplore.models import Batch, Domain, TaskSpec, create_model

    size, batch = (224, 64) if not args.quick else (32, 4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    model_name, vit_name = ("medformer_base", "vit_base_patch16_224") if not args.quick else ("medformer_tiny", None)
    med = create_model(model_name, tasks=[TaskSpec("label", "binary", 1)], patch_size=16 if not args.quick else 4,
                       in_chans=3).to(device).train()
    vit = (timm.create_model(vit_name, pretrained=False, num_classes=2, img_size=size) if vit_name else
           timm.models.vision_transformer.VisionTransformer(img_size=size, patch_size=4, embed_dim=192, depth=12,
                                                            num_heads=3, num_classes=2)).to(device).train()
    data = Batch.from_images(images, Domain("2d", "xray", "chest"), {"label": labels.tolist()}).to(device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

    def med_loss():
        with autocast():
            return med.compute_loss(med(data), data)[0]

    def vit_loss():
        with autocast():
            return torch.nn.functional.cross_entropy(vit(images), labels)

    steps = {"medformer": bench_model.train_step_fn(med, torch.optim.AdamW(med.parameters(), 1e-4), med_loss),
             "timm": bench_model.train_step_fn(vit, torch.optim.AdamW(vit.parameters(), 1e-4), vit_loss)}
    t = bench_model.alternate(steps, args.reps, device)
    with torch.utils.flop_counter.FlopCounterMode(display=False,
                                                  custom_mapping=bench_model.attention_flop_formulas()) as counter:
        med_loss().backward()
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" and not args.quick else 512)
    achieved = counter.get_total_flops() / t["medformer"] / 1e12
    return {"ok": True, "model": model_name, "batch": f"{batch} x {size}^2", "dtype": str(dtype).split(".")[-1],
            "medformer_samples_per_s": batch / t["medformer"], "timm_samples_per_s": batch / t["timm"],
            "vs_timm": t["timm"] / t["medformer"], "tflops": achieved, "matmul_peak_tflops": peak,
            "mfu": achieved / peak}


def matmul_peak(device, dtype, n: int, reps: int = 10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(bench_model.timed(lambda: a @ b, device) for _ in range(reps))
    return 2 * n ** 3 / best / 1e12


def check_varlen(args, device) -> dict:
    shapes = bench_model.bench_shapes(argparse.Namespace(mixed_batch=32 if not args.quick else 8, reps=args.reps), device)
    t, tokens = shapes["times"], shapes["tokens"]
    out = {"ok": True, "per_token_all_different_vs_same": (t["all-different"] / tokens["all-different"]) /
           (t["same-shape"] / tokens["same-shape"]), "segments": shapes["segments"]["all-different"]}
    if "all-different, per-segment attention" in t:
        out["varlen_speedup_over_per_segment"] = t["all-different, per-segment attention"] / t["all-different"]
    return out


def check_compile(args, device) -> dict:
    from medexplore.models import Batch, Domain, TaskSpec, create_model

    torch.manual_seed(0)
    batch = 128 if not args.quick else 4
    images = torch.randn(batch, 1, 28, 28, device=device)
    data = Batch.from_images(images, Domain("2d", "xray", "chest"), {"label": [i % 2 for i in range(batch)]}).to(device)
    results = {}
    for name in ("eager", "compiled"):
        model = create_model("medformer_tiny", tasks=[TaskSpec("label", "binary", 1)], patch_size=4).to(device).train()
        run = torch.compile(model) if name == "compiled" else model
        step = bench_model.train_step_fn(model, torch.optim.AdamW(model.parameters(), 1e-4),
                                         lambda: model.compute_loss(run(data), data)[0])
        results[f"{name}_first_step_s"] = bench_model.timed(step, device)
        results[f"{name}_step_s"] = bench_model.alternate({name: step}, args.reps, device)[name]
    return {"ok": True, **results, "speedup": results["eager_step_s"] / results["compiled_step_s"]}


def _tiny_npz(path: Path, n=(64, 16, 16)) -> Path:
    g = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        labels = g.integers(0, 2, (count, 1))
        arrays[f"{split}_images"] = (g.random((count, 28, 28)) * 100 + labels[:, :, None] * 100).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    np.savez(path, **arrays)
    return path


def check_torchrun(args, device) -> dict:
    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    npz = _tiny_npz(work / "pneumoniamnist.npz")
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "medexplore.cli", "train",
            "--dataset", "pneumoniamnist", "--data-path", str(npz), "--quiet", "--set", "model.depth=2",
            "--set", "train.epochs=2", "--set", "train.batch_size=8", "--set", f"train.device={device.type}",
            "--set", "train.checkpoint_every=1", "--set", "train.augment=false"]
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    started = time.perf_counter()
    full = subprocess.run([*base, "--out", str(work / "full")], capture_output=True, text=True, env=env,
                          timeout=args.timeout)
    if full.returncode:
        return {"ok": False, "error": full.stderr[-1000:]}
    seconds = time.perf_counter() - started
    proc = subprocess.Popen([*base, "--out", str(work / "cut")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    deadline = time.time() + args.timeout
    while not (work / "cut" / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a crash after the first epoch, mid-second
    proc.wait()
    resumed = subprocess.run([*base, "--out", str(work / "cut"), "--resume"], capture_output=True, text=True,
                             env=env, timeout=args.timeout)
    if resumed.returncode:
        return {"ok": False, "error": resumed.stderr[-1000:]}
    a = load_file(str(work / "full" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(work / "cut" / "checkpoints" / "last" / "model.safetensors"))
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return {"ok": worst == 0.0, "backend": "nccl" if device.type == "cuda" else "gloo", "run_s": seconds,
            "resumed_bitwise": worst == 0.0, "max_abs_diff": worst}


def check_inference(args, device) -> dict:
    from medexplore.analysis.inference import infer_image
    from medexplore.data.embedded import EMBEDDED_TASKS
    from medexplore.models import Domain, create_model

    side = 128 if not args.quick else 32
    model = create_model("medformer_tiny", tasks=list(EMBEDDED_TASKS), patch_size=4, embed_dim=96, depth=4,
                         num_heads=4).to(device).eval()
    volume = torch.from_numpy(np.random.default_rng(0).random((1, side, side, side), dtype=np.float32))
    domain = Domain("3d", "mri", "brain")
    infer_image(model, volume[:, :32, :32, :32], domain, device=device)  # warm-up
    start = time.perf_counter()
    result = infer_image(model, volume, domain, device=device)
    bench_model.sync(device)
    return {"ok": True, "volume": f"{side}^3", "seconds": time.perf_counter() - start,
            "windows": result.num_windows, "outputs": sorted([*result.scores, *result.boxes, *result.segmentations])}


def write_summary(path, device_name: str, rows: dict) -> None:
    Path(path).write_text(json.dumps({"device": device_name, "torch": torch.__version__, "steps": rows}, indent=1))


CHECKS = {"tests": check_tests, "throughput": check_throughput, "varlen": check_varlen, "compile": check_compile,
          "torchrun": check_torchrun, "inference": check_inference}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--timeout", type=int, default=300, help="seconds per subprocess")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--quick", action="store_true", help="toy sizes (checks the script, measures nothing)")
    p.add_argument("--dry-run", action="store_true", help="check arguments, imports and device, then stop")
    args = p.parse_args(argv)
    if args.reps < 1 or args.timeout < 1:
        p.error("--reps and --timeout must be >= 1")
    device = torch.device(args.device)
    available = device.type != "cuda" or torch.cuda.is_available()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and available else device.type
    print(f"torch {torch.__version__}, device {args.device}: {name if available else 'not available'}; "
          f"steps: {', '.join(args.steps)}")
    if args.dry_run:
        import timm  # noqa: F401  (the steps' imports resolve)

        from medexplore.analysis.inference import infer_image  # noqa: F401
        print("dry run: arguments and imports checked; nothing run")
        return 0
    if not available:
        print("no CUDA device here; run it on a GPU machine (or --device cpu --quick to check the script)")
        return 2
    rows = {}
    for step in args.steps:
        start = time.perf_counter()
        try:
            rows[step] = CHECKS[step](args, device)
        except Exception as exc:  # a failed step is a result; the others still run
            rows[step] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        rows[step]["wall_s"] = time.perf_counter() - start
        print(f"[{step}] {'ok' if rows[step]['ok'] else 'FAILED'} ({rows[step]['wall_s']:.0f} s)", flush=True)
        write_summary(args.out, name, rows)  # after every step: a run stopped midway keeps what it measured
    print("\n| step | ok | figures |\n|---|---|---|")
    for step, row in rows.items():
        figures = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                            if k not in ("ok", "traceback", "wall_s"))
        print(f"| {step} | {'yes' if row['ok'] else 'NO'} | {figures} |")
    print(f"\nwritten: {args.out}")
    return 0 if all(r["ok"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
