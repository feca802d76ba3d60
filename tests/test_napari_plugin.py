"""napari-medexplore in a real viewer under Xvfb: readers, sample data, every widget end to end, bad input."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

napari = pytest.importorskip("napari")
pytest.importorskip("napari_medexplore")

from conftest import REGION, REGION_DOMAIN  # noqa: E402
from napari.layers import Labels, Shapes  # noqa: E402

from medexplore.data.embedded import EMBEDDED_TASKS, EmbeddedDataset  # noqa: E402
from medexplore.data.registry import vocab_for  # noqa: E402
from medexplore.models import create_model  # noqa: E402
from medexplore.train.checkpoint import save_checkpoint  # noqa: E402

PLUGIN = "napari-medexplore"
WAIT_MS = 120_000


def checkpoint_of(model, folder: Path) -> Path:
    return save_checkpoint(folder, model, {"step": 0})


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An (untrained) model with every embedded task: tests here check plumbing and placement, not skill."""
    torch.manual_seed(0)
    vocab = vocab_for(EmbeddedDataset("test"))
    model = create_model("medformer_tiny", tasks=list(EMBEDDED_TASKS), embed_dim=32, depth=2, num_heads=2,
                         patch_size=8, seg_channels=8, vocab=vocab)
    return checkpoint_of(model, tmp_path_factory.mktemp("ckpt") / "tiny")


def dock(viewer, name):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def run_inference(qtbot, widget):
    worker = widget.run()
    assert worker is not None, widget.status.value
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=WAIT_MS)  # idle again: the worker has finished
    return worker


# ---------------------------------------------------------------------------- packaging, readers, samples
def test_manifest_validates():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(npe2), "validate", PLUGIN], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


VIEWER_FIRST = """
import sys
import napari
viewer = napari.Viewer(show=True)  # on Xvfb: Mesa's llvmpipe maps its LLVM now
assert "napari_medexplore" not in sys.modules and "triton._C.libtriton" not in sys.modules
viewer.window.add_plugin_dock_widget("napari-medexplore", "Run a checkpoint")  # imports torch's compiler stack
from medexplore.models import create_model
create_model("medformer_tiny", tasks=[], embed_dim=32, depth=1, num_heads=2)
print("widget opened")
"""


def test_the_plugin_opens_in_a_viewer_that_exists_before_it():
    """The user's order (viewer, then plugin) in a fresh process: triton's LLVM must not bind to Mesa's."""
    result = subprocess.run([sys.executable, "-c", VIEWER_FIRST], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "widget opened" in result.stdout, (result.returncode, result.stderr[-2000:])


WARM_LAYERS = """
import sys
import numba
from napari_medexplore._layers import warm_layers
warm_layers()
used = [f for name, module in list(sys.modules.items()) if name.startswith("napari") and module is not None
        for f in vars(module).values() if isinstance(f, numba.core.dispatcher.Dispatcher) and f.signatures]
print(len(used), sum(sum(f.stats.cache_hits.values()) for f in used), sum(sum(f.stats.cache_misses.values()) for f in used))
"""


def test_warm_layers_leaves_napari_numba_code_in_the_disk_cache(tmp_path):
    """What set-up runs: in a later process the box and mask layers' numba code loads from the cache, none compiles."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    counts = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", WARM_LAYERS], capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        counts.append([int(v) for v in result.stdout.split()[-3:]])
    (used, hits, misses), (used_again, hits_again, misses_again) = counts
    assert used > 0 and hits == 0 and misses > 0  # the first process compiles (the cache folder was empty)
    assert used_again == used and misses_again == 0 and hits_again == misses


def test_nifti_reader_keeps_spacing_and_orientation(make_napari_viewer, tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.zeros((6, 7, 8), np.float32)
    data[1, 2, 3] = 10.0  # one marked voxel
    affine = np.array([[-2.0, 0, 0, 40], [0, 3.0, 0, -20], [0, 0, 4.0, 5], [0, 0, 0, 1]])  # x flipped (LAS)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    assert layer.scale.tolist() == [4.0, 3.0, 2.0]  # (z, y, x) in mm
    np.testing.assert_array_equal(layer.metadata["original_affine"], affine)
    marker = np.argwhere(layer.data == 10.0)[0]
    world_zyx = np.asarray(layer.translate) + marker * np.asarray(layer.scale)
    # the layer puts the voxel where the file's own affine puts it (the array was reoriented to RAS)
    np.testing.assert_allclose(world_zyx[::-1], (affine @ np.r_[1, 2, 3, 1])[:3], atol=1e-5)
    assert layer.metadata["header"]["pixdim"][1:4] == [2.0, 3.0, 4.0]


def test_dicom_reader_file_and_series(make_napari_viewer, tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    viewer = make_napari_viewer()
    (ct,) = viewer.open(get_testdata_file("CT_small.dcm"), plugin=PLUGIN)
    assert ct.data.shape == (128, 128) and ct.scale.tolist() == pytest.approx([0.661468, 0.661468])
    assert ct.metadata["medexplore_domain"]["modality"] == "ct" and ct.metadata["header"]["Modality"] == "CT"
    series = tmp_path / "series"
    series.mkdir()
    for k in range(3):  # three slices 2.5 mm apart, written out of order
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.InstanceNumber = k
        ds.save_as(series / f"{(k * 7) % 3}.dcm")
    (volume,) = viewer.open(str(series), plugin=PLUGIN)
    assert volume.data.shape == (3, 128, 128) and volume.scale.tolist() == pytest.approx([2.5, 0.661468, 0.661468])


def test_medmnist_npz_reader_gives_a_stack_per_split_with_labels(make_napari_viewer, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{s}_{k}": (rng.integers(0, 255, (n, 28, 28), dtype=np.uint8) if k == "images"
                           else rng.integers(0, 2, (n, 1)))
              for s, n in (("train", 5), ("val", 2), ("test", 3)) for k in ("images", "labels")}
    path = tmp_path / "pneumoniamnist.npz"
    np.savez(path, **arrays)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin=PLUGIN)
    assert [layer.name for layer in layers] == ["pneumoniamnist train", "pneumoniamnist val", "pneumoniamnist test"]
    test = layers[2]
    assert test.data.shape == (3, 28, 28)
    assert test.metadata["features"]["label"].tolist() == arrays["test_labels"][:, 0].tolist()
    assert test.metadata["medexplore_domain"]["modality"] == "xray"


def test_sample_data_is_the_real_anatomy_at_full_size(make_napari_viewer):
    viewer = make_napari_viewer()
    t1, tissue = viewer.open_sample(PLUGIN, "mni152_t1")
    assert t1.data.shape == (95, 117, 99) and t1.scale.tolist() == [2.0, 2.0, 2.0]
    assert isinstance(tissue, Labels) and set(np.unique(tissue.data)) == {0, 1, 2, 3}
    (ct,) = viewer.open_sample(PLUGIN, "ct_slice")
    assert ct.data.min() < -500  # Hounsfield units
    retina, lesions = viewer.open_sample(PLUGIN, "retina_with_lesions")
    assert retina.rgb and retina.data.shape == (353, 353, 3) and lesions.data.sum() > 50
    brain, brain_lesions = viewer.open_sample(PLUGIN, "mni152_with_lesions")
    assert brain.data.shape == t1.data.shape and brain_lesions.data.max() == 1 and brain_lesions.data.sum() > 100
    assert brain_lesions.features["name"].tolist() == ["background", "lesion"]


# ---------------------------------------------------------------------------- inference
def test_inference_on_a_volume_adds_aligned_layers_and_a_table(make_napari_viewer, qtbot, tiny_checkpoint,
                                                               monkeypatch):
    from napari_medexplore import _common

    released = []  # threads that freed their OpenMP team
    monkeypatch.setattr(_common, "release_thread_team", lambda: released.append(threading.get_ident()))
    viewer = make_napari_viewer()
    t1, _ = viewer.open_sample(PLUGIN, "mni152_t1")
    t1.translate = (-90.0, -126.0, -72.0)
    widget = dock(viewer, "Run a checkpoint")
    widget.checkpoint.folder.value = tiny_checkpoint
    widget.select_layer(t1)
    assert widget.domain.domain.modality == "mri"  # prefilled from the layer's metadata
    widget.window.value = 48  # the 95 x 117 x 99 volume goes through 3 x 3 x 3 overlapping windows
    for key in ("rollout", "grad_cam"):
        widget.explain_boxes[key].value = True
    widget.explain_task.value = "lesion"
    run_inference(qtbot, widget)
    names = [layer.name for layer in viewer.layers]
    assert "MNI152 T1 tissue" in names and "MNI152 T1 lesion_mask" in names, widget.status.value
    for name in ("MNI152 T1 tissue", "MNI152 T1 rollout", "MNI152 T1 grad_cam:lesion"):
        layer = viewer.layers[name]
        assert layer.data.shape == t1.data.shape
        assert layer.scale.tolist() == t1.scale.tolist() and layer.translate.tolist() == t1.translate.tolist()
    assert isinstance(viewer.layers["MNI152 T1 tissue"], Labels)
    assert viewer.layers["MNI152 T1 rollout"].blending == "additive"
    results = t1.metadata["medexplore_results"]
    assert {"lesion", "lesion_count"} <= set(results["task"]) and widget.table.shape[0] == len(results)
    assert "27 window(s)" in widget.status.value
    gui = threading.main_thread().ident
    assert released[0] == gui and released[-1] != gui  # the GUI thread's team before the worker, the worker's after


def test_boxes_are_drawn_around_their_pixels_and_a_one_voxel_box_shows_in_the_3d_view(make_napari_viewer):
    from napari.layers import Layer

    from napari_medexplore._layers import BOX_STYLE, box_shapes

    shapes, owner = box_shapes(np.array([[2, 3, 4, 3, 4, 5], [0, 1, 1, 2, 4, 3]], np.float32))  # (start, stop) per axis
    assert owner.tolist() == [0, 1, 1]  # one rectangle per slice of each box's z range
    np.testing.assert_array_equal(shapes[0], [[2, 2.5, 3.5], [2, 2.5, 4.5], [2, 3.5, 4.5], [2, 3.5, 3.5]])
    assert [s[0, 0] for s in shapes[1:]] == [0, 1]
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((6, 8, 8), np.float32))
    layer = viewer.add_layer(Layer.create(shapes, dict(BOX_STYLE), "shapes"))
    viewer.dims.ndisplay = 3  # napari cannot triangulate a rectangle whose corners coincide
    assert len(layer.data) == 3


def test_inference_on_a_2d_rgb_image_places_boxes_on_it_with_the_checkpoints_thresholds(
        make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    from medexplore.models import InferenceDefaults
    from medexplore.train.checkpoint import load_model

    model, _ = load_model(tiny_checkpoint)
    model.inference = InferenceDefaults(box_thresholds={"lesion_boxes": 0.35}, mask_thresholds={"lesion_mask": 0.0})
    calibrated = checkpoint_of(model, tmp_path / "calibrated")
    viewer = make_napari_viewer()
    retina, _ = viewer.open_sample(PLUGIN, "retina_with_lesions")
    widget = dock(viewer, "Run a checkpoint")
    widget.checkpoint.folder.value = calibrated
    assert widget.box_threshold.value == pytest.approx(0.35)  # the checkpoint's threshold is the field's default
    widget.select_layer(retina)
    widget.explain_boxes["rollout"].value = False
    run_inference(qtbot, widget)
    mask = viewer.layers["retina with lesions lesion_mask"]
    assert mask.data.shape == (353, 353) and mask.data.all()  # every probability reaches the stored 0.0
    boxes = [layer for layer in viewer.layers if isinstance(layer, Shapes)]
    if boxes:  # an untrained model may find none above the threshold
        assert boxes[0].features["score"].min() >= 0.35
        assert boxes[0].data[0].shape == (4, 2)
    widget.checkpoint.folder.value = tiny_checkpoint  # a checkpoint without calibration: back to 0.5
    assert widget.box_threshold.value == pytest.approx(0.5)


def test_attribution_overlay_is_brightest_where_the_answer_is(make_napari_viewer, qtbot, tmp_path, region_model):
    model, positives = region_model
    folder = checkpoint_of(model, tmp_path / "region")
    viewer = make_napari_viewer(show=True)  # drawn on the Xvfb display, for the screenshot
    source = viewer.add_image(positives[0].image[0].numpy(), name="xray",
                              metadata={"medexplore_domain": {"dimensionality": "2d", "modality": "xray",
                                                              "body_part": "chest"}})
    assert REGION_DOMAIN.modality == "xray"
    widget = dock(viewer, "Run a checkpoint")
    widget.checkpoint.folder.value = folder
    widget.select_layer(source)
    widget.explain_boxes["rollout"].value = False
    widget.explain_boxes["integrated_gradients"].value = True
    widget.explain_task.value = "target"
    run_inference(qtbot, widget)
    overlay = viewer.layers["xray integrated_gradients:target"]
    values = np.abs(overlay.data)
    inside = np.zeros_like(values, dtype=bool)
    inside[REGION] = True
    assert values[inside].sum() / values.sum() > 4 * inside.mean()
    # on screen: only the overlay, grey; the brightness centroid falls inside the region
    source.visible = False
    overlay.colormap, overlay.contrast_limits, overlay.blending = "gray", (0, float(values.max())), "translucent"
    overlay.data = values
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float).mean(-1)
    zoom, centre = viewer.camera.zoom, np.asarray(viewer.camera.center[-2:])

    def on_screen(rows, cols):  # data pixel edges -> screenshot pixels
        corners = [(np.array([r, c]) - 0.5 - centre) * zoom + np.array(shot.shape) / 2 for r, c in
                   ((rows.start, cols.start), (rows.stop, cols.stop))]
        (r0, c0), (r1, c1) = [np.round(c).astype(int) for c in corners]
        return slice(r0, r1), slice(c0, c1)

    image_area = np.zeros(shot.shape, bool)
    image_area[on_screen(slice(0, 32), slice(0, 32))] = True
    region = np.zeros(shot.shape, bool)
    region[on_screen(*REGION)] = True
    assert region.sum() > 100  # the region covers many screen pixels
    assert shot[region].mean() > 3 * shot[image_area & ~region].mean()


def test_bad_input_is_reported_and_nothing_is_added(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path, monkeypatch):
    viewer = make_napari_viewer()
    widget = dock(viewer, "Run a checkpoint")
    labels = viewer.add_labels(np.zeros((32, 32), np.int32), name="a labels layer")
    image = viewer.add_image(np.random.rand(32, 32).astype(np.float32), name="flat")
    count = len(viewer.layers)

    def refused(expect: str):
        assert widget.run() is None
        assert expect in widget.status.value, widget.status.value
        assert len(viewer.layers) == count and widget.run_button.enabled

    refused("no checkpoint chosen")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    widget.checkpoint.folder.value = broken
    refused("corrupt JSON")
    incompatible = tmp_path / "incompatible"
    checkpoint_of(create_model("medformer_tiny", tasks=list(EMBEDDED_TASKS), embed_dim=32, depth=2, num_heads=2),
                  incompatible)
    meta = json.loads((incompatible / "meta.json").read_text())
    meta["model"]["config"]["depth"] = 3
    (incompatible / "meta.json").write_text(json.dumps(meta))
    widget.checkpoint.folder.value = incompatible
    refused("incompatible")
    widget.checkpoint.folder.value = tiny_checkpoint
    widget.layer.value = labels if labels in widget.layer.choices else None
    refused("no image layer chosen" if widget.layer.value is None else "Labels")
    widget.select_layer(image)
    widget.domain.dimensionality.value = "3d"  # a 2D image cannot go to a 3D model input
    refused("3d model needs 3 spatial axes")
    widget.domain.dimensionality.value = "2d"
    widget.window.value = 12  # not a multiple of the patch size (8)
    refused("multiples of the patch size")
    widget.window.value = 0
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 1024})())
    refused("GiB are free")
    monkeypatch.undo()
    # a cancelled job adds nothing and leaves the widget idle
    big = viewer.add_image(np.random.rand(256, 256).astype(np.float32), name="big")
    widget.select_layer(big)
    widget.window.value = 16
    count = len(viewer.layers)
    worker = widget.run()
    worker.yielded.connect(lambda _step: widget.cancel())
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=WAIT_MS)
    assert len(viewer.layers) == count and "cancelled" in widget.status.value


def test_layer_context_menu_commands_run_the_inference_widget(make_napari_viewer, qtbot, tiny_checkpoint):
    from napari_medexplore._menus import explain_layer, segment_layer

    viewer = make_napari_viewer()
    (ct,) = viewer.open_sample(PLUGIN, "ct_slice")
    viewer.layers.selection.active = ct
    assert segment_layer(viewer) is None  # no checkpoint chosen yet: reported, nothing runs
    widget = dock(viewer, "Run a checkpoint")
    widget.checkpoint.folder.value = tiny_checkpoint
    assert explain_layer(viewer) is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=WAIT_MS)
    assert "CT slice rollout" in viewer.layers and "CT slice grad_cam:lesion" in viewer.layers
    assert "CT slice lesion_mask" in viewer.layers


def test_shipped_models_come_first_in_the_checkpoint_list_and_run(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from medexplore.pretrained import pretrained_models

    monkeypatch.setenv("MEDEXPLORE_RUNS", str(tmp_path / "runs"))
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.random.default_rng(0).random((28, 28)).astype(np.float32), name="chest")
    widget = dock(viewer, "Run a checkpoint")
    shipped = [str(m.folder) for m in pretrained_models().values()]
    choices = [str(c) for c in widget.checkpoint.recent.choices if c is not None]
    assert shipped and choices[:len(shipped)] == shipped
    widget.checkpoint.recent.value = choices[0]
    assert str(widget.checkpoint.folder.value) == shipped[0]  # a checkpoint folder itself, not a run's
    widget.select_layer(layer)
    widget.domain.modality.value, widget.domain.body_part.value = "xray", "chest"
    widget.explain_boxes["rollout"].value = False
    run_inference(qtbot, widget)
    model, _ = widget.checkpoint.load()
    two_d = {name for name, spec in model.tasks.items() if "2d" in spec.dimensionalities}
    assert set(layer.metadata["medexplore_results"]["task"]) == two_d, widget.status.value


# ---------------------------------------------------------------------------- training
def test_training_widget_pause_stop_leave_a_checkpoint_and_an_idle_ui(make_napari_viewer, qtbot, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("MEDEXPLORE_RUNS", str(tmp_path / "runs"))
    viewer = make_napari_viewer()
    widget = dock(viewer, "Train")
    inference = dock(viewer, "Run a checkpoint")
    widget.epochs.value, widget.steps.value, widget.batch_size.value = 50, 40, 16
    widget.run_name.value = "from-widget"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: any(e.kind == "step" and e.step >= 2 for e in widget.history), timeout=WAIT_MS)
    widget.toggle_pause()
    qtbot.waitUntil(lambda: any(e.kind == "paused" for e in widget.history), timeout=WAIT_MS)
    step = widget.history[-1].step
    meta = json.loads((tmp_path / "runs" / "from-widget" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == step  # pausing saved a checkpoint
    qtbot.wait(600)
    assert max(e.step for e in widget.history) <= step + 1  # paused: no progress
    widget.toggle_pause()
    qtbot.waitUntil(lambda: max(e.step for e in widget.history) > step + 1, timeout=WAIT_MS)
    widget.stop()
    qtbot.waitUntil(lambda: widget.start_button.enabled, timeout=WAIT_MS)
    run = tmp_path / "runs" / "from-widget"
    assert (run / "checkpoints" / "last" / "meta.json").exists()
    assert "stopped" in widget.status.value and not widget.stop_button.enabled
    assert str(run) in [str(c) for c in inference.checkpoint.recent.choices]  # listed for inference at once
    lines = widget.curves.ax_loss.get_lines()
    assert lines and len(lines[0].get_xdata()) >= 3  # the live plot was fed


def test_training_widget_refuses_a_bad_configuration(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDEXPLORE_RUNS", str(tmp_path / "runs"))
    viewer = make_napari_viewer()
    widget = dock(viewer, "Train")
    widget.dataset.value = "folder"
    assert widget.start() is None and "needs a CSV" in widget.status.value and widget.start_button.enabled
    widget.dataset.value = "embedded"
    widget.run_name.value = "../escape"
    assert widget.start() is None and "plain folder name" in widget.status.value


# ---------------------------------------------------------------------------- explorer and domain latents
def test_embedding_explorer_links_points_and_images(make_napari_viewer, qtbot, tiny_checkpoint):
    from matplotlib.backend_bases import MouseEvent

    viewer = make_napari_viewer()
    widget = dock(viewer, "Embedding explorer")
    widget.checkpoint.folder.value = tiny_checkpoint
    assert widget.compute() is not None
    qtbot.waitUntil(lambda: widget.embeddings is not None, timeout=WAIT_MS)
    n = len(widget.embeddings.pooled)
    assert widget.coords.shape == (n, 2) and widget.method.value == "pca"
    assert widget.color_by.value == "modality"
    # hover over a point: its image is shown
    index = 5
    x, y = widget.plot.ax.transData.transform(widget.coords[index])
    widget.plot.canvas.callbacks.process("motion_notify_event",
                                         MouseEvent("motion_notify_event", widget.plot.canvas, x, y))
    (shown,) = [layer.data for layer in viewer.layers if layer.name.startswith("medexplore: hovered") and layer.visible]
    np.testing.assert_array_equal(shown, widget.sample_image(index))
    # a lasso around some points opens their images; moving through the stack highlights each point
    pts = widget.coords
    box = [(pts[:, 0].min() - 1, pts[:, 1].min() - 1), (np.median(pts[:, 0]), pts[:, 1].min() - 1),
           (np.median(pts[:, 0]), pts[:, 1].max() + 1), (pts[:, 0].min() - 1, pts[:, 1].max() + 1)]
    count = len(viewer.layers)
    widget._on_lasso(box)
    assert len(widget.plot.selection.get_xdata()) == len(widget.selected) > 0  # marked at once...
    qtbot.waitUntil(lambda: len(viewer.layers) == count + 1, timeout=WAIT_MS)  # ...and the stack follows
    stack = viewer.layers[-1]
    assert widget.color_by.value == "modality"  # napari re-reads widget choices on layer changes: kept
    indices = stack.metadata["medexplore_explorer_indices"]
    assert len(indices) >= 1 and set(indices) <= set(widget.selected.tolist())
    viewer.layers.selection.active = stack
    viewer.dims.set_current_step(0, len(indices) - 1)
    hx, hy = widget.plot.highlight.get_data()
    np.testing.assert_allclose([hx[0], hy[0]], widget.coords[indices[-1]])
    # UMAP arrives from its worker and replaces PCA
    qtbot.waitUntil(lambda: "umap" in widget.projections, timeout=300_000)
    assert widget.method.value == "umap" and widget.coords.shape == (n, 2)


def test_explorer_embeds_every_image_of_the_visible_medmnist_stacks_with_labels(make_napari_viewer, qtbot, tmp_path):
    from medexplore.models import TaskSpec

    rng = np.random.default_rng(1)
    arrays = {f"{s}_{k}": (rng.integers(0, 255, (n, 28, 28), dtype=np.uint8) if k == "images"
                           else rng.integers(0, 2, (n, 1)))
              for s, n in (("train", 6), ("val", 2), ("test", 20)) for k in ("images", "labels")}
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    torch.manual_seed(0)
    model = create_model("medformer_tiny", tasks=[TaskSpec("breastmnist", "binary", 1)], embed_dim=32, depth=2,
                         num_heads=2, patch_size=4)
    folder = checkpoint_of(model, tmp_path / "breast")
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path / "breastmnist.npz"), plugin=PLUGIN)
    layers[0].visible, layers[2].visible = False, True  # the test split only
    widget = dock(viewer, "Embedding explorer")
    widget.checkpoint.folder.value = folder
    widget.source.value = "every image of the visible layers"
    assert widget.compute() is not None
    qtbot.waitUntil(lambda: widget.embeddings is not None, timeout=WAIT_MS)
    table = widget.embeddings.metadata
    assert len(table) == 20 and table["index"].tolist() == list(range(20))  # every image of the test stack, in order
    assert table["label:breastmnist"].tolist() == arrays["test_labels"][:, 0].tolist()
    np.testing.assert_array_equal(widget.sample_image(3), np.asarray(widget.samples[3].image[0]))
    qtbot.waitUntil(lambda: "umap" in widget.projections, timeout=300_000)
    layers[2].visible = False
    with pytest.raises(Exception, match="only visible layers count"):
        from napari_medexplore._explorer_widget import layer_samples
        layer_samples(viewer, model.config.patch_sizes, every_image=True)


def test_domain_latent_overlays_sum_to_one(make_napari_viewer, tiny_checkpoint):
    viewer = make_napari_viewer()
    (ct,) = viewer.open_sample(PLUGIN, "ct_slice")
    widget = dock(viewer, "Domain latents")
    widget.checkpoint.folder.value = tiny_checkpoint
    widget.layer.value = ct
    added = widget.run()
    assert [layer.metadata["group"] for layer in added] == ["dimensionality", "modality", "body_part"]
    total = sum(layer.data for layer in added)
    np.testing.assert_allclose(total, 1.0, atol=1e-4)  # each token's attention over all latents sums to one
    assert all(layer.scale.tolist() == ct.scale.tolist() for layer in added)
    assert widget.plot.figure.axes and "share per group" in widget.status.value
    widget.layer.value = None
    assert widget.run() is None and "no image layer" in widget.status.value


def test_training_widget_adapts_with_a_strategy(make_napari_viewer, qtbot, tmp_path, monkeypatch, tiny_checkpoint):
    from medexplore.train.checkpoint import load_model

    monkeypatch.setenv("MEDEXPLORE_RUNS", str(tmp_path / "runs"))
    viewer = make_napari_viewer()
    widget = dock(viewer, "Train")
    assert widget.general.native.isHidden()  # shown only for gmoe
    widget.strategy.value = "gmoe"
    assert not widget.general.native.isHidden()
    assert widget.start() is None and "adapt.general" in widget.status.value  # gmoe without its general expert
    widget.strategy.value = "lora"
    assert widget.start() is None and "--init" in widget.status.value  # nothing pretrained to adapt
    widget.size.value = "as the start checkpoint"  # its architecture, whatever the size list offers
    assert widget.start() is None and "needs a start checkpoint" in widget.status.value
    widget.init.value = tiny_checkpoint
    widget.epochs.value, widget.steps.value, widget.batch_size.value = 1, 2, 8
    widget.run_name.value = "lora-run"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.start_button.enabled, timeout=WAIT_MS)
    assert any(e.kind == "adapted" and e.message.startswith("lora:") for e in widget.history)
    model, _ = load_model(tmp_path / "runs" / "lora-run" / "checkpoints" / "last")
    start, _ = load_model(tiny_checkpoint)
    assert model.adaptation["strategy"] == "lora"
    assert {k: v for k, v in model.config.to_dict().items() if k != "vocab"} == \
        {k: v for k, v in start.config.to_dict().items() if k != "vocab"}


def test_domain_view_shows_gmoe_gate_weights(make_napari_viewer, tiny_checkpoint, tmp_path):
    from medexplore.adapt import apply_strategy
    from medexplore.train.checkpoint import load_model

    model, _ = load_model(tiny_checkpoint)
    apply_strategy(model, "gmoe", [load_model(tiny_checkpoint)[0]])
    gmoe = checkpoint_of(model, tmp_path / "gmoe")
    viewer = make_napari_viewer()
    (ct,) = viewer.open_sample(PLUGIN, "ct_slice")
    widget = dock(viewer, "Domain latents")
    widget.checkpoint.folder.value = gmoe
    widget.layer.value = ct
    assert widget.run() is not None
    assert "gate: medical 0.50, general 0.50" in widget.status.value  # a fresh gate weighs both equally
    assert len(widget.plot.figure.axes) == 2
