"""Regenerate the README's napari screenshots by driving a real viewer (run under Xvfb on a headless machine).

    xvfb-run -a .venv/bin/python scripts/napari_screenshots.py [--out docs/napari] [--root DIR]

Every panel with the shipped models (medformer-medmnist-embedded-v5, and medformer-photos-vicreg-v2 as the
GMoE's general expert) on real MedMNIST images (the official files: ``--root``, ``$MEDMNIST_ROOT`` or
``../shared/data/medmnist``); then medformer-medmnist-embedded-v5 on the sample images (``--only-samples``:
just those).
"""
from __future__ import annotations

import argparse
import os
import tempfile
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
    if viewer.dims.ndisplay == 2:  # fit the image to the canvas the dock left
        viewer.reset_view()
        QApplication.processEvents()
    imwrite(path, viewer.screenshot(canvas_only=False, flash=False))
    print("wrote", path)


def open_widget(viewer, name: str):
    """The named widget as the only dock on the right."""
    viewer.window.remove_dock_widget("all")
    return viewer.window.add_plugin_dock_widget(PLUGIN, name)[1]


def positive_test_image(viewer, path: Path):
    """Open a MedMNIST file (one stack layer per split), keep its test split and show its first image of label 1."""
    layers = viewer.open(path, plugin=PLUGIN)
    test = next(layer for layer in layers if layer.name.endswith(" test"))
    for layer in layers:
        if layer is not test:
            viewer.layers.remove(layer)
    test.visible = True
    labels = test.metadata["features"]["label"].to_numpy()
    viewer.dims.set_current_step(0, int(np.flatnonzero(labels == 1)[0]))
    return test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/napari")
    parser.add_argument("--root", default=None, help="folder of the official MedMNIST files")
    parser.add_argument("--only-samples", action="store_true", help="only the sample images with the embedded model")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari

    # medexplore (torch, and triton through it) before the first canvas maps Mesa's LLVM (napari_medexplore._llvm)
    from medexplore.experiments.showcase import SHIPPED_GENERAL, SHIPPED_MEDMNIST, official_medmnist_root
    from medexplore.pretrained import pretrained_folder

    if args.only_samples:
        app = QApplication.instance() or napari.qt.get_qapp()
        viewer = napari.Viewer(show=True)
        viewer.window.resize(1500, 950)
        samples(app, viewer, out)
        viewer.close()
        return

    root = official_medmnist_root(args.root)
    if root is None:
        raise SystemExit("the official MedMNIST files were not found (--root, $MEDMNIST_ROOT or ../shared/data/medmnist): "
                         "the inference screenshots show the shipped model on them")
    os.environ["MEDEXPLORE_RUNS"] = tempfile.mkdtemp(prefix="medexplore-screenshots-")  # the training panel's run
    app = QApplication.instance() or napari.qt.get_qapp()
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)

    # 1. the shipped model on real MedMNIST test images: a chest X-ray (2D), then an adrenal CT volume (3D view)
    shipped = str(pretrained_folder(SHIPPED_MEDMNIST))
    xray = positive_test_image(viewer, root / "pneumoniamnist.npz")
    infer = open_widget(viewer, "Run a checkpoint")
    infer.checkpoint.folder.value = shipped
    infer.select_layer(xray)
    infer.explain_boxes["rollout"].value = True
    infer.explain_task.value = "pneumoniamnist"
    infer.run()
    wait_idle(app, lambda: infer.run_button.enabled and "done" in infer.status.value)
    viewer.layers[f"{xray.name} rollout"].opacity = 0.45
    save(viewer, out / "inference.png")

    viewer.layers.clear()
    ct = positive_test_image(viewer, root / "adrenalmnist3d.npz")
    infer.select_layer(ct)
    infer.explain_task.value = "adrenalmnist3d"
    infer.run()
    wait_idle(app, lambda: infer.run_button.enabled and "done" in infer.status.value)
    viewer.dims.ndisplay = 3
    rollout = viewer.layers[f"{ct.name} rollout"]
    rollout.rendering, rollout.blending = "mip", "additive"
    ct.rendering = "attenuated_mip"
    viewer.camera.angles = (15, 30, 110)
    viewer.camera.zoom = 12
    save(viewer, out / "inference_3d.png")
    viewer.dims.ndisplay = 2

    # 2. domain latents on a real fundus photograph (RetinaMNIST test)
    viewer.layers.clear()
    fundus = positive_test_image(viewer, root / "retinamnist.npz")
    domain = open_widget(viewer, "Domain latents")
    domain.checkpoint.folder.value = shipped
    domain.layer.value = fundus
    domain.run()
    for layer in list(viewer.layers)[1:]:
        layer.visible = layer.metadata.get("group") == "body_part"
    save(viewer, out / "domain_latents.png")

    # 3. embedding explorer: every test image of the five real files, the shipped model; UMAP coloured by
    # modality, a lasso selection opened as a stack
    viewer.layers.clear()
    for name in ("pneumoniamnist", "breastmnist", "retinamnist", "adrenalmnist3d", "vesselmnist3d"):
        positive_test_image(viewer, root / f"{name}.npz")
    explorer = open_widget(viewer, "Embedding explorer")
    explorer.checkpoint.folder.value = shipped
    explorer.source.value = "every image of the visible layers"
    explorer.compute()
    wait_idle(app, lambda: "umap" in explorer.projections)
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    pts = explorer.coords
    xray = np.flatnonzero(explorer.embeddings.metadata["modality"].to_numpy() == "xray")
    centre = np.median(pts[xray], 0)  # a lasso in the middle of the X-rays
    box = [tuple(centre + d) for d in ([-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0])]
    explorer._on_lasso(box)
    wait_idle(app, lambda: len(viewer.layers) > 0)
    viewer.layers.selection.active = viewer.layers[-1]
    viewer.dims.set_current_step(0, 0)
    save(viewer, out / "explorer.png")

    samples(app, viewer, out)  # before the training panel, whose "finished" notification would cover them

    # 4. training panel: a GMoE-Adapter on BreastMNIST from the two shipped experts, with its live plot
    viewer.layers.clear()
    train = open_widget(viewer, "Train")
    train.dataset.value = "breastmnist"
    train.data_path.value = root
    train.init.value = shipped
    train.size.value = "as the start checkpoint"
    train.strategy.value = "gmoe"
    train.general.value = str(pretrained_folder(SHIPPED_GENERAL))
    train.run_name.value = "breast-gmoe"
    train.epochs.value, train.steps.value = 4, 10
    train.start()
    wait_idle(app, lambda: train.start_button.enabled and train.history)
    save(viewer, out / "training.png")
    viewer.close()


def samples(app, viewer, out: Path) -> None:
    """The embedded shipped model on File > Open Sample's images: the retina with lesions (lesion mask and
    boxes) and the healthy MNI152 brain (tissue, no lesion), each with the defaults it was calibrated to."""
    from medexplore.experiments.showcase import SHIPPED_MEDMNIST
    from medexplore.pretrained import pretrained_folder

    model = str(pretrained_folder(SHIPPED_MEDMNIST))
    viewer.layers.clear()
    retina, truth = viewer.open_sample(PLUGIN, "retina_with_lesions")
    truth.visible = False  # the inserted lesions' own mask: the model's mask and boxes show instead
    infer = open_widget(viewer, "Run a checkpoint")
    infer.checkpoint.folder.value = model
    infer.explain_boxes["rollout"].value = False  # the lesion mask and boxes alone, on the photograph
    infer.select_layer(retina)
    infer.run()
    wait_idle(app, lambda: infer.run_button.enabled and "done" in infer.status.value)
    save(viewer, out / "inference_retina_lesions.png")

    viewer.layers.clear()
    t1, _ = viewer.open_sample(PLUGIN, "mni152_t1")
    viewer.layers.remove(viewer.layers[-1])  # the template's own labels: the model's tissue layer shows instead
    infer.select_layer(t1)
    infer.run()
    wait_idle(app, lambda: infer.run_button.enabled and "done" in infer.status.value)
    viewer.dims.set_current_step(0, t1.data.shape[0] // 2)
    save(viewer, out / "inference_mni152.png")


if __name__ == "__main__":
    main()
