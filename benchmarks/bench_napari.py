"""The napari plugin's responsiveness and speed, in a real viewer (run under Xvfb: ``xvfb-run -a``).

- ``latency``: event-loop latency while the training widget trains medformer_tiny on the embedded
  default (a QTimer probe every 10 ms; p50/p99 of the lateness), and the widget's training throughput
  as a ratio to the CLI's path (``run_training`` on the main thread, no GUI) for the same steps,
  measured in the same process, CLI first.
- ``overlays``: from Run to every overlay (segmentation, attention rollout, LayerGradCam) on a
  128 x 128 x 128 volume with medformer_tiny on CPU: patch 16 (the whole volume is 512 tokens, one
  window) and patch 8 (4,096 tokens); the reference is one plain forward pass of the same model. Then the
  shipped models (patch 4, sliding windows of their calibrated size) on that volume and on the MNI152
  sample: rollout + Grad-CAM against their tasks alone, measured in the same run.
- ``workers``: Run to every overlay (rollout + Grad-CAM) with the default shipped model on the 128^3 volume and
  on the MNI152 sample, idle OpenMP teams freed (the GUI thread's before the worker starts, the worker's when it
  ends: ``compute_worker``, ``start_worker``) against kept, alternated over ``--reps`` after a warm-up; and the
  same call from the library on the main thread (no worker) as the floor.
- ``explorer``: 20,000 embedding points: time from embeddings to the PCA view, UMAP time (first fit in
  this fresh process), hover (motion event to image shown) and lasso selection (to the stack layer);
  and the time to compute embeddings of the embedded dataset with medformer_tiny, per 1,000 images.
- ``layers``: napari's numba code for Run's box and mask layers (``warm_layers``) in a machine's first
  process (an empty numba cache) against a later process (what set-up's call leaves every user's first Run).

Usage: xvfb-run -a python benchmarks/bench_napari.py [--only latency,overlays,workers,explorer,layers]
       [--seconds 60] [--reps 3]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

PLUGIN = "napari-medexplore"


def _app():
    import napari

    return napari.qt.get_qapp()


def _process_until(app, condition, timeout_s: float = 1800) -> None:
    start = time.time()
    while not condition():
        app.processEvents()
        time.sleep(0.002)
        if time.time() - start > timeout_s:
            raise TimeoutError("timed out")


def bench_latency(seconds: float) -> dict:
    import napari
    from qtpy.QtCore import QTimer

    from medexplore.train.workflow import run_training

    app = _app()
    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    widget.size.value = "tiny"
    widget.batch_size.value = 16
    widget.epochs.value, widget.steps.value = 1, 10_000
    with tempfile.TemporaryDirectory() as tmp:
        config = widget.config()
        steps = {"n": 0}
        # the CLI's path first: the same config on the main thread, timed over a fixed number of steps
        cli_times = []

        def count(event):
            if event.kind == "step":
                cli_times.append(time.perf_counter())
                if len(cli_times) >= 40:
                    control.stop()

        from medexplore.train import RunControl

        control = RunControl()
        run_training(config, Path(tmp) / "cli", callbacks=[count], control=control, test=False)
        cli_rate = (len(cli_times) - 11) / (cli_times[-1] - cli_times[10])

        import os

        os.environ["MEDEXPLORE_RUNS"] = tmp
        widget.run_name.value = "widget"
        lateness, last = [], [time.perf_counter()]

        def probe():
            now = time.perf_counter()
            lateness.append(now - last[0] - 0.010)
            last[0] = now

        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(probe)
        widget.start()
        _process_until(app, lambda: sum(e.kind == "step" for e in widget.history) >= 10)
        lateness.clear()
        last[0] = time.perf_counter()
        timer.start()
        start = time.time()
        _process_until(app, lambda: time.time() - start > seconds)
        timer.stop()
        step_times = [e for e in widget.history if e.kind == "step"]
        widget.stop()
        _process_until(app, lambda: widget.start_button.enabled)
        steps["n"] = len(step_times)
    rates = [e.samples_per_s for e in step_times[10:]]
    widget_rate = np.median(rates) / config["train"]["batch_size"]
    viewer.close()
    late_ms = np.array(lateness) * 1000
    return {"probe_p50_ms": float(np.percentile(late_ms, 50)), "probe_p99_ms": float(np.percentile(late_ms, 99)),
            "probes": len(late_ms), "cli_steps_per_s": cli_rate, "widget_steps_per_s": float(widget_rate),
            "throughput_ratio": float(widget_rate / cli_rate), "steps_seen": steps["n"]}


def _run_to_overlays(app, napari, volume: np.ndarray, folder, domain: dict, explain: dict, task: str) -> tuple[float, str]:
    """Seconds from Run to every overlay in a fresh viewer, and the widget's final status."""
    viewer = napari.Viewer(show=False)
    layer = viewer.add_image(volume, name="volume", metadata={"medexplore_domain": domain})
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Run a checkpoint")
    widget.checkpoint.folder.value = folder
    widget.select_layer(layer)
    for name, box in widget.explain_boxes.items():
        box.value = explain.get(name, False)
    widget.explain_task.value = task
    start = time.perf_counter()
    widget.run()
    _process_until(app, lambda: widget.run_button.enabled)
    elapsed = time.perf_counter() - start
    status = widget.status.value
    assert "done" in status, status
    viewer.close()
    return elapsed, status


def bench_overlays() -> dict:
    import napari
    import torch

    from medexplore.data.embedded import EMBEDDED_TASKS
    from medexplore.data.examples import mni152_t1
    from medexplore.models import Batch, Domain, create_model
    from medexplore.pretrained import pretrained_folder
    from medexplore.train.checkpoint import save_checkpoint

    app = _app()
    results = {}
    volume = np.random.default_rng(0).normal(size=(128, 128, 128)).astype(np.float32)
    brain = {"dimensionality": "3d", "modality": "mri", "body_part": "brain"}
    overlays = {"rollout": True, "grad_cam": True}
    for patch in (16, 8):
        torch.manual_seed(0)
        model = create_model("medformer_tiny", tasks=list(EMBEDDED_TASKS), patch_size=patch).eval()
        with torch.no_grad():
            model(Batch.from_images([torch.from_numpy(volume)[None]], [Domain("3d", "mri", "brain")]), tasks=[])
            start = time.perf_counter()
            model(Batch.from_images([torch.from_numpy(volume)[None]], [Domain("3d", "mri", "brain")]), tasks=[])
            forward = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_checkpoint(Path(tmp) / "ckpt", model, {"step": 0})
            elapsed, status = _run_to_overlays(app, napari, volume, folder, brain, overlays, "lesion")
        results[f"patch{patch}"] = {"run_to_overlays_s": elapsed, "forward_s": forward,
                                    "ratio_to_forward": elapsed / forward, "status": status}
    # the shipped models (patch 4, their default windows): every task without maps (the reference), then
    # with rollout and Grad-CAM; on the 128^3 volume and on the MNI152 sample. The MedMNIST model classifies
    # only; the embedded ones also segment lesions and tissue and draw lesion boxes (v2: the default before v3 and v4,
    # whose full-resolution decoder stage is half as wide)
    ct = {"dimensionality": "3d", "modality": "ct", "body_part": "adrenal"}
    t1 = mni152_t1().image[0]
    for prefix, name, task, domain_128 in (("shipped", "medformer-medmnist5-v1", "adrenalmnist3d", ct),
                                           ("embedded_v2", "medformer-medmnist-embedded-v2", "lesion", brain),
                                           ("embedded", "medformer-medmnist-embedded-v5", "lesion", brain)):
        shipped = pretrained_folder(name)
        if shipped is None:
            continue
        for key, image, domain in ((f"{prefix}_128", volume, domain_128), (f"{prefix}_mni152", t1, brain)):
            plain, _ = _run_to_overlays(app, napari, image, shipped, domain, {}, task)
            elapsed, status = _run_to_overlays(app, napari, image, shipped, domain, overlays, task)
            results[key] = {"run_to_overlays_s": elapsed, "tasks_only_s": plain,
                            "ratio_to_tasks_only": elapsed / plain, "status": status}
    return results


def bench_workers(reps: int) -> dict:
    import napari

    from medexplore.analysis.inference import infer_image
    from medexplore.data.examples import mni152_t1
    from medexplore.experiments.showcase import SHIPPED_MEDMNIST
    from medexplore.models import Domain
    from medexplore.pretrained import pretrained_folder
    from medexplore.train.checkpoint import load_model
    from napari_medexplore import _common

    app = _app()
    folder = pretrained_folder(SHIPPED_MEDMNIST)
    model, _ = load_model(folder)
    brain = {"dimensionality": "3d", "modality": "mri", "body_part": "brain"}
    overlays = {"rollout": True, "grad_cam": True}
    teams = {"teams kept": lambda: mock.patch.object(_common, "release_thread_team", lambda: False),
                "teams freed": contextlib.nullcontext}
    images = {"128": np.random.default_rng(0).normal(size=(128, 128, 128)).astype(np.float32),
              "mni152": mni152_t1().image[0]}
    results = {"model": SHIPPED_MEDMNIST}
    for key, image in images.items():
        _run_to_overlays(app, napari, image, folder, brain, overlays, "lesion")  # warm-up
        times = {name: [] for name in (*teams, "library call, main thread")}
        for _ in range(reps):
            for name, variant in teams.items():
                with variant():
                    times[name].append(_run_to_overlays(app, napari, image, folder, brain, overlays, "lesion")[0])
            start = time.perf_counter()
            infer_image(model, image[None], Domain("3d", "mri", "brain"), explain_methods=("rollout", "grad_cam"),
                        explain_task="lesion")
            times["library call, main thread"].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) for name, t in times.items()}
        results[key] = {**{f"{name} s": m for name, m in medians.items()},
                        "kept / freed": medians["teams kept"] / medians["teams freed"],
                        "freed / library call": medians["teams freed"] / medians["library call, main thread"],
                        "all": times}
    return results


def bench_explorer(points: int) -> dict:
    import os

    import napari
    import pandas as pd
    import torch
    from matplotlib.backend_bases import MouseEvent

    from medexplore.analysis.embeddings import EmbeddingSet, compute_embeddings
    from medexplore.data.embedded import EMBEDDED_TASKS, EmbeddedDataset
    from medexplore.models import create_model

    os.environ["MEDEXPLORE_CACHE"] = tempfile.mkdtemp()  # UMAP's first fit, not a cached projection
    app = _app()
    torch.manual_seed(0)
    model = create_model("medformer_tiny", tasks=list(EMBEDDED_TASKS), patch_size=4).eval()
    dataset = EmbeddedDataset("train")
    start = time.perf_counter()
    compute_embeddings(model, dataset, progress=False)
    embed_per_1000 = (time.perf_counter() - start) / len(dataset) * 1000
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (12, 192))
    groups = rng.integers(0, 12, points)
    pooled = (centres[groups] + rng.normal(0, 1, (points, 192))).astype(np.float32)
    sources = [dataset[i] for i in range(len(dataset))]
    samples = [sources[i % len(sources)] for i in range(points)]
    metadata = pd.DataFrame({"modality": [s.domain.modality for s in samples], "cluster": groups.astype(str)})
    embeddings = EmbeddingSet(pooled, metadata)
    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Embedding explorer")
    start = time.perf_counter()
    worker = widget.show_embeddings(embeddings, samples)  # draws the PCA scatter synchronously
    app.processEvents()
    pca_view = time.perf_counter() - start
    start = time.perf_counter()
    _process_until(app, lambda: "umap" in widget.projections)
    umap_time = time.perf_counter() - start
    widget.plot.canvas.draw()
    hovers = []
    for index in rng.integers(0, points, 30):
        x, y = widget.plot.ax.transData.transform(widget.coords[index])
        start = time.perf_counter()
        widget.plot.canvas.callbacks.process("motion_notify_event",
                                             MouseEvent("motion_notify_event", widget.plot.canvas, x, y))
        app.processEvents()
        hovers.append(time.perf_counter() - start)
    pts = widget.coords
    lo, mid = pts.min(0), np.median(pts, 0)
    box = [(lo[0] - 1, lo[1] - 1), (mid[0], lo[1] - 1), (mid[0], mid[1]), (lo[0] - 1, mid[1])]
    layers = len(viewer.layers)
    start = time.perf_counter()
    widget._on_lasso(box)
    selection = time.perf_counter() - start  # the selected points are marked on the plot
    _process_until(app, lambda: len(viewer.layers) > layers)
    stack = time.perf_counter() - start  # and their images are a stack layer
    del worker
    viewer.close()
    return {"points": points, "pca_view_s": pca_view, "umap_first_fit_s": umap_time,
            "hover_p50_ms": float(np.median(hovers) * 1000), "hover_p90_ms": float(np.percentile(hovers, 90) * 1000),
            "hover_max_ms": float(np.max(hovers) * 1000),
            "lasso_to_marked_ms": selection * 1000, "lasso_to_stack_ms": stack * 1000, "selected": int(len(widget.selected)),
            "embed_s_per_1000_images": embed_per_1000}


WARM_LAYERS = "from napari_medexplore._layers import warm_layers; print(warm_layers())"


def bench_layers() -> dict:
    """``warm_layers``' seconds in a machine's first process (an empty numba cache), then in a later one."""
    import os
    import subprocess
    import sys

    seconds = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(2):
            run = subprocess.run([sys.executable, "-c", WARM_LAYERS], env={**os.environ, "NUMBA_CACHE_DIR": cache},
                                 capture_output=True, text=True, check=True)
            seconds.append(float(run.stdout.split()[-1]))
    return {"first_process_s": seconds[0], "later_process_s": seconds[1], "ratio": seconds[1] / seconds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="latency,overlays,explorer,layers")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--points", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=3, help="alternations of ``workers``")
    args = parser.parse_args()
    for case in args.only.split(","):
        result = {"latency": lambda: bench_latency(args.seconds), "overlays": bench_overlays,
                  "workers": lambda: bench_workers(args.reps),
                  "explorer": lambda: bench_explorer(args.points), "layers": bench_layers}[case]()
        print(case, json.dumps(result, indent=1, default=float), flush=True)


if __name__ == "__main__":
    main()
