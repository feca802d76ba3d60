"""Layer context-menu commands: open (or reuse) the inference widget on the clicked layer and run it."""
from __future__ import annotations

from napari.viewer import Viewer

from ._common import report_error


def _inference_widget(viewer: Viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-medexplore", "Run a checkpoint")
    return widget


def _run_on_active_layer(viewer: Viewer, explanations: dict[str, bool]):
    layer = viewer.layers.selection.active
    widget = _inference_widget(viewer)
    widget.select_layer(layer)
    for key, box in widget.explain_boxes.items():
        box.value = explanations.get(key, False)
    try:
        widget.checkpoint.path  # noqa: B018 (raises with the message to show when none is chosen)
    except Exception as exc:
        report_error(exc, "the layer command")
        return None
    return widget.run()


def segment_layer(viewer: Viewer):
    """Segment, classify and detect on the active layer with the inference widget's checkpoint."""
    return _run_on_active_layer(viewer, {})


def explain_layer(viewer: Viewer):
    """Attention rollout and LayerGradCam of the active layer with the inference widget's checkpoint."""
    return _run_on_active_layer(viewer, {"rollout": True, "grad_cam": True})
