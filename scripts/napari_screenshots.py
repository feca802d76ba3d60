"""Regenerate the README's napari screenshots by driving a real viewer (run under Xvfb on a headless machine).

    xvfb-run -a .venv/bin/python scripts/napari_screenshots.py [--out docs/napari] [--run runs/example]

Uses a trained example model (``medexplore.train.workflow.example_run``, trained on first use, ~2 CPU
minutes) so the overlays show what a model learned.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

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

    imwrite(path, viewer.screenshot(canvas_only=False, flash=False))
    print("wrote", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/napari")
    parser.add_argument("--run", default="runs/example")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from medexplore.train.workflow import example_run

    checkpoint = example_run(args.run)
    app = QApplication.instance() or napari.qt.get_qapp()
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)

    # 1. inference on the full-size MNI152 volume: tissue segmentation and attention rollout, 3D view
    t1, tissue = viewer.open_sample(PLUGIN, "mni152_t1")
    tissue.visible = False
    _, infer = viewer.window.add_plugin_dock_widget(PLUGIN, "Run a checkpoint")
    infer.checkpoint.folder.value = checkpoint
    infer.select_layer(t1)
    infer.window.value = 16  # the example model was trained on 16^3 patches
    infer.explain_boxes["rollout"].value = True
    infer.run()
    wait_idle(app, lambda: infer.run_button.enabled and "done" in infer.status.value)
    viewer.layers["MNI152 T1 lesion_mask"].visible = False
    viewer.dims.set_current_step(0, 47)
    save(viewer, out / "inference.png")
    viewer.dims.ndisplay = 3
    viewer.layers["MNI152 T1 rollout"].visible = False
    viewer.camera.angles = (15, 30, 110)
    save(viewer, out / "inference_3d.png")
    viewer.dims.ndisplay = 2

    # 2. domain latents on the retina
    viewer.layers.clear()
    retina, _ = viewer.open_sample(PLUGIN, "retina_with_lesions")
    _, domain = viewer.window.add_plugin_dock_widget(PLUGIN, "Domain latents")
    domain.checkpoint.folder.value = checkpoint
    domain.layer.value = retina
    domain.run()
    for layer in list(viewer.layers)[2:]:
        layer.visible = layer.metadata.get("group") == "modality"
    save(viewer, out / "domain_latents.png")
    viewer.window.remove_dock_widget(domain.native)

    # 3. embedding explorer: PCA, then UMAP, coloured by modality; a lasso selection opened as a stack
    viewer.layers.clear()
    _, explorer = viewer.window.add_plugin_dock_widget(PLUGIN, "Embedding explorer")
    explorer.checkpoint.folder.value = checkpoint
    explorer.compute()
    wait_idle(app, lambda: "umap" in explorer.projections)
    pts = explorer.coords
    centre = np.median(pts, 0)
    box = [tuple(centre + d) for d in ([-1.5, -1.5], [1.5, -1.5], [1.5, 1.5], [-1.5, 1.5])]
    explorer._on_lasso(box)
    save(viewer, out / "explorer.png")
    viewer.window.remove_dock_widget(explorer.native)

    # 4. training panel with its live plot
    viewer.layers.clear()
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    train.epochs.value, train.steps.value = 2, 15
    train.start()
    wait_idle(app, lambda: train.start_button.enabled and train.history)
    save(viewer, out / "training.png")
    viewer.close()


if __name__ == "__main__":
    main()
