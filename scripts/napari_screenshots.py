"""Regenerate the README's napari screenshots by driving a real viewer (run under Xvfb on a headless machine).

    xvfb-run -a .venv/bin/python scripts/napari_screenshots.py [--out docs/napari] [--run runs/example]

Uses a trained example model (``medexplore.experiments.demo.example_run``, trained on first use, ~2 CPU
minutes) so the overlays show what a model learned.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import QApplication

PLUGIN = "napari-medexplore"


def wait_idle(app, condition, timeout_s: float = 600) -> None:
    import time

    start = time.time()
    while not condition():
        app.processEvents()
        time.sleep(0.05)
        if time.time() - start > timeout_s:
            raise TimeoutError("the widget did not finish in time")


def save(viewer, path: Path) -> None:
    from imageio.v3 import imwrite

    for _ in range(20):  # let deferred layer additions and redraws land
        QApplication.processEvents()
    imwrite(path, viewer.screenshot(canvas_only=False, flash=False))
    print("wrote", path)


def open_widget(viewer, name: str):
    """The named widget as the only dock on the right."""
    viewer.window.remove_dock_widget("all")
    return viewer.window.add_plugin_dock_widget(PLUGIN, name)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/napari")
    parser.add_argument("--run", default="runs/example")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari

    from medexplore.experiments.demo import example_run

    checkpoint = example_run(args.run)
    app = QApplication.instance() or napari.qt.get_qapp()
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)

    # 1. inference on the full-size MNI152 volume: tissue segmentation and attention rollout, 3D view
    t1, tissue = viewer.open_sample(PLUGIN, "mni152_t1")
    tissue.visible = False
    infer = open_widget(viewer, "Run a checkpoint")
    infer.checkpoint.folder.value = checkpoint
    infer.select_layer(t1)
    infer.window.value = 16  # the example model was trained on 16^3 patches
    infer.explain_boxes["rollout"].value = True
    infer.run()
    wait_idle(app, lambda: infer.run_button.enabled and "done" in infer.status.value)
    viewer.layers["MNI152 T1 lesion_mask"].visible = False
    viewer.layers["MNI152 T1 lesion_boxes"].visible = False  # the example model's boxes are weak (see issue notes)
    viewer.dims.set_current_step(0, 47)
    save(viewer, out / "inference.png")
    viewer.dims.ndisplay = 3
    for name in ("MNI152 T1 rollout", "MNI152 T1"):
        viewer.layers[name].visible = False
    viewer.layers["MNI152 T1 tissue"].opacity = 1.0
    viewer.camera.angles = (15, 30, 110)
    save(viewer, out / "inference_3d.png")
    viewer.dims.ndisplay = 2

    # 2. domain latents on the retina
    viewer.layers.clear()
    retina, _ = viewer.open_sample(PLUGIN, "retina_with_lesions")
    domain = open_widget(viewer, "Domain latents")
    domain.checkpoint.folder.value = checkpoint
    domain.layer.value = retina
    domain.run()
    viewer.layers["retina with lesions labels"].visible = False
    for layer in list(viewer.layers)[2:]:
        layer.visible = layer.metadata.get("group") == "body_part"
    save(viewer, out / "domain_latents.png")

    # 3. embedding explorer: PCA, then UMAP, coloured by modality; a lasso selection opened as a stack
    viewer.layers.clear()
    explorer = open_widget(viewer, "Embedding explorer")
    explorer.checkpoint.folder.value = checkpoint
    explorer.compute()
    wait_idle(app, lambda: "umap" in explorer.projections)
    pts = explorer.coords
    centre = np.median(pts, 0)
    box = [tuple(centre + d) for d in ([-1.5, -1.5], [1.5, -1.5], [1.5, 1.5], [-1.5, 1.5])]
    explorer._on_lasso(box)
    wait_idle(app, lambda: len(viewer.layers) > 0)
    viewer.layers.selection.active = viewer.layers[-1]
    viewer.dims.set_current_step(0, 0)
    save(viewer, out / "explorer.png")

    # 4. training panel with its live plot
    viewer.layers.clear()
    train = open_widget(viewer, "Train")
    train.epochs.value, train.steps.value = 2, 15
    train.start()
    wait_idle(app, lambda: train.start_button.enabled and train.history)
    save(viewer, out / "training.png")
    viewer.close()


if __name__ == "__main__":
    main()
