"""Between napari layers and medexplore: images and domains out of layers, results into layer data.

Pure functions on arrays and layer attributes (no Qt), so the widgets stay thin and testable.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from medexplore.analysis.inference import ImageInference
from medexplore.errors import UserError
from medexplore.models.kinds import kind_entry
from medexplore.models.tasks import Domain

DOMAIN_KEY = "medexplore_domain"
MAP_COLORMAPS = {"rollout": "inferno", "attention": "magma", "integrated_gradients": "turbo", "grad_cam": "turbo"}
BOX_STYLE = {"shape_type": "rectangle", "edge_color": "yellow", "face_color": "transparent", "edge_width": 1}


def domain_metadata(domain: Domain) -> dict:
    return {DOMAIN_KEY: {"dimensionality": domain.dimensionality, "modality": domain.modality,
                         "body_part": domain.body_part}}


def layer_domain(layer) -> Domain:
    """The domain stored by medexplore's readers, else a guess from the layer's shape (modality unknown)."""
    stored = layer.metadata.get(DOMAIN_KEY)
    if stored:
        return Domain(stored["dimensionality"], stored.get("modality", "unknown"), stored.get("body_part", "unknown"))
    spatial = layer.data.ndim - (1 if getattr(layer, "rgb", False) else 0)
    return Domain("3d" if spatial >= 3 else "2d", "unknown", "unknown")


def layer_image(layer, domain: Domain, current_step: tuple[int, ...] = ()) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(image (C, *spatial), leading index)`` for the model from an Image layer.

    A stack of 2D images (N, H, W) under a 2D domain gives the slice the viewer shows; the leading index
    says which, so results can be placed on it.
    """
    from napari.layers import Image

    if not isinstance(layer, Image):
        raise TypeError(f"layer {layer.name!r} is a {type(layer).__name__} layer; choose an Image layer")
    data = np.asarray(layer.data)
    rgb = bool(getattr(layer, "rgb", False))
    dims = 2 if domain.dimensionality == "2d" else 3
    spatial_ndim = data.ndim - (1 if rgb else 0)
    if spatial_ndim < dims:
        raise UserError(f"layer {layer.name!r} has shape {data.shape}; a {domain.dimensionality} model needs "
                         f"{dims} spatial axes")
    lead = tuple(int(i) for i in current_step[:spatial_ndim - dims]) if spatial_ndim > dims else ()
    if len(lead) < spatial_ndim - dims:
        lead = (0,) * (spatial_ndim - dims)
    image = data[lead] if lead else data
    image = np.moveaxis(image, -1, 0) if rgb else image[None]
    return np.ascontiguousarray(image, dtype=np.float32), lead


def placement(layer, spatial_ndim: int) -> dict:
    """Scale and translate of the source's last ``spatial_ndim`` axes, so derived layers lie exactly on it."""
    data_ndim = layer.ndim
    scale = tuple(float(s) for s in layer.scale[data_ndim - spatial_ndim:])
    translate = tuple(float(t) for t in layer.translate[data_ndim - spatial_ndim:])
    return {"scale": scale, "translate": translate}


def result_features(result: ImageInference, model) -> pd.DataFrame:
    """One row per task output: classification probabilities, regression values, detection counts."""
    rows = []
    for task, values in result.scores.items():
        spec = model.tasks[task]
        names = kind_entry(spec.kind).output_names(spec, np.size(values))
        for name, value in zip(names, np.atleast_1d(values)):
            rows.append({"task": task, "kind": spec.kind.value, "output": name, "value": float(value)})
    for task, (boxes, scores) in result.boxes.items():
        rows.append({"task": task, "kind": "detection", "output": "boxes found", "value": float(len(boxes))})
    for task, mask in result.segmentations.items():
        spec = model.tasks[task]
        for label in range(1, spec.num_outputs):
            name = spec.label_names[label] if spec.label_names else f"class {label}"
            rows.append({"task": task, "kind": "segmentation", "output": f"{name} voxels",
                         "value": float((mask == label).sum())})
    return pd.DataFrame(rows, columns=["task", "kind", "output", "value"])


def box_shapes(boxes: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Rectangles around boxes (``start, stop`` per axis, in pixels): one per box in 2D, one per slice of its
    z range in 3D. Corners sit on the outer edges of the box's first and last pixels (napari puts pixel
    centres on integers), so a one-pixel box is a unit square, never a point, which napari's 3D view
    cannot triangulate.

    Returns the napari vertices and, per rectangle, the index of its box.
    """
    shapes, owner = [], []
    dims = boxes.shape[1] // 2 if len(boxes) else 2
    for k, box in enumerate(boxes):
        lo, hi = box[:dims] - 0.5, box[dims:] - 0.5  # the pixel edges: first pixel's outer side, last pixel's
        y0, x0, y1, x1 = lo[-2], lo[-1], hi[-2], hi[-1]
        corners = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], np.float32)
        slices = [None] if dims == 2 else range(int(np.floor(box[0])), int(np.ceil(box[dims] - 1)) + 1)
        for z in slices:
            shapes.append(corners if z is None else np.concatenate([np.full((4, 1), z, np.float32), corners], 1))
            owner.append(k)
    return shapes, np.array(owner, np.int64)


def result_layers(source, result: ImageInference, model, spatial_ndim: int) -> list[tuple]:
    """Layer data tuples for everything in ``result``, placed on the last ``spatial_ndim`` axes of ``source``."""
    where = placement(source, spatial_ndim)
    layers = []
    for task, mask in result.segmentations.items():
        spec = model.tasks[task]
        meta = {"task": task, "label_names": list(spec.label_names), "source_layer": source.name}
        layers.append((mask, {"name": f"{source.name} {task}", "metadata": meta, "opacity": 0.5, **where}, "labels"))
    for key, values in result.maps.items():
        method = key.split(":")[0]
        low, high = float(values.min()), float(values.max())
        layers.append((values.astype(np.float32), {
            "name": f"{source.name} {key}", "colormap": MAP_COLORMAPS.get(method, "inferno"), "blending": "additive",
            "opacity": 0.6, "contrast_limits": (low, high if high > low else low + 1e-6),
            "metadata": {"method": method, "source_layer": source.name}, **where}, "image"))
    for task, (boxes, scores) in result.boxes.items():
        shapes, owner = box_shapes(boxes)
        if not shapes:
            continue
        features = pd.DataFrame({"box": owner, "score": np.asarray(scores, np.float32)[owner]})
        layers.append((shapes, {"name": f"{source.name} {task}", **BOX_STYLE, "features": features,
                                "metadata": {"task": task, "source_layer": source.name}, **where}, "shapes"))
    return layers


def warm_layers() -> float:
    """Build a box and a mask layer of each dimensionality as Run does, so that napari's numba code for
    them (box triangulation, label colours: ``cache=True``) is compiled into numba's on-disk cache once
    per machine, which set-up runs, instead of in a user's first Run (11.5 s on 2 CPU cores); returns the seconds it took."""
    from napari.layers import Layer

    start = time.perf_counter()
    for ndim in (2, 3):
        shapes, _ = box_shapes(np.array([[1.0] * ndim + [4.0] * ndim], np.float32))
        Layer.create(shapes, dict(BOX_STYLE), "shapes")
        Layer.create(np.zeros((4,) * ndim, np.int32), {}, "labels")
    return time.perf_counter() - start
