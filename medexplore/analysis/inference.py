"""Every task of a checkpoint, and its explanations, on one image of any size.

Images larger than the model's input go through overlapping sliding windows with Gaussian blending
(:class:`~medexplore.analysis.sliding.WindowBlender`, equal to MONAI's ``sliding_window_inference``
without its slow import): segmentation probabilities and
explanation maps are blended per voxel, classification/regression outputs are averaged over the
windows and detection boxes are moved to image coordinates and merged by non-maximum suppression.
Front-ends (napari, notebooks) call :func:`infer_image`; it holds no UI code.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..configs import token_budget
from ..data.sample import Batch
from ..data.transforms import normalize_intensity, prepare_image
from ..errors import UserError
from ..models.boxes import box_iou
from ..models.findings import mask_regions
from ..models.heads import SegmentationHead
from ..models.kinds import kind_entry, task_scores
from ..models.medformer import Medformer
from ..models.tasks import Domain
from .attribution import (
    ATTENTION_METHODS,
    ATTRIBUTION_METHODS,
    GRADIENT_METHODS,
    GradCamProbe,
    block_attentions,
    default_targets,
    explain_images,
)
from .sliding import WindowBlender

__all__ = ["DEFAULT_OVERLAP", "ImageInference", "infer_image", "iter_infer_image", "window_for", "windows_per_batch",
           "estimate_inference_memory"]

BATCH_TOKENS = 2048  # tokens per forward pass of windows by default: 4 windows of the CPU budget's 512
# Window overlap by dimensionality. Training crops hold their findings whole, and a finding cut by a window's
# edge scores low there (lesions of the retina sample: P 0.95-0.99 centred in a 48-px window, 0.01-0.88 and
# mostly under 0.6 in a corner). At 0.5 in 2D every finding up to half a window across lies wholly inside
# some window, for twice the windows of 0.25 (0.5 s -> 0.9 s on the retina sample); in 3D 0.5 costs 3.4x
# the windows of 0.25, past the interactive budget (README, napari benchmarks); 0.1 halves them on the MNI152
# sample (150 -> 80) but puts 3 false lesion boxes on the healthy brain (none at 0.25).
DEFAULT_OVERLAP = {2: 0.5, 3: 0.25}
_BYTES = 4


@dataclass
class ImageInference:
    """What :func:`infer_image` found, at the input image's resolution (arrays are NumPy)."""

    segmentations: dict[str, np.ndarray] = field(default_factory=dict)  # task -> integer mask (*spatial)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # task -> probabilities, or values (K,)
    boxes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # task -> (K, 2d) corners, (K,)
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # "rollout", "grad_cam:lesion", ... -> (*spatial)
    window: tuple[int, ...] = ()
    num_windows: int = 0


def window_for(model: Medformer, spatial: Sequence[int], window: int | Sequence[int] | None = None,
               max_tokens: int | None = None, device: str = "cpu") -> tuple[int, ...]:
    """The sliding window for an image of size ``spatial``: ``window`` checked, or the automatic choice:
    the whole image when it has at most ``max_tokens`` tokens, else the largest cube that does. By default
    ``max_tokens`` is the model's (``model.inference.max_tokens``: the largest image it was calibrated on),
    else the training token budget of ``device`` (:func:`medexplore.configs.token_budget`)."""
    patch = model.config.patch_sizes[len(spatial)]
    if max_tokens is None:
        max_tokens = model.inference.max_tokens.get(f"{len(spatial)}d") or token_budget(str(device))
    max_tokens = int(max_tokens)
    fit = tuple(math.ceil(s / patch) * patch for s in spatial)  # the whole image, padded to whole patches
    if window is None:
        if math.prod(f // patch for f in fit) <= max_tokens:
            return fit
        edge = patch * max(1, int(math.floor(max_tokens ** (1 / len(spatial)) + 1e-9)))
        return tuple(min(edge, f) for f in fit)
    size = (int(window),) * len(spatial) if np.isscalar(window) else tuple(int(w) for w in window)
    if len(size) != len(spatial) or any(w <= 0 or w % patch for w in size):
        raise UserError(f"window {window} must give {len(spatial)} positive multiples of the patch size {patch}")
    return tuple(min(w, f) for w, f in zip(size, fit))


def windows_per_batch(model: Medformer, window: Sequence[int]) -> int:
    """Windows per forward pass by default: as many as hold ``BATCH_TOKENS`` tokens, at least one (larger
    passes measured slower in ``benchmarks/bench_napari.py``; see the README's benchmark table)."""
    tokens = math.prod(w // model.config.patch_sizes[len(window)] for w in window)
    return max(1, BATCH_TOKENS // tokens)


def estimate_inference_memory(model: Medformer, image_shape: Sequence[int], window: Sequence[int],
                              explain_methods: Sequence[str] = (), batch_windows: int | None = None) -> int:
    """Rough peak bytes: the blended outputs at image size plus one batch of windows' activations."""
    batch_windows = windows_per_batch(model, window) if batch_windows is None else batch_windows
    spatial = tuple(image_shape[1:])
    voxels = math.prod(spatial)
    seg_channels = sum(s.num_outputs for s in model.tasks.values() if kind_entry(s.kind).output == "mask")
    outputs = (seg_channels + len(explain_methods) + 2) * voxels * _BYTES * 2  # values + blending weights
    tokens = math.prod(w // model.config.patch_sizes[len(window)] for w in window)
    cfg = model.config
    activations = tokens * cfg.embed_dim * cfg.depth * (6 + 2 * cfg.mlp_ratio) * _BYTES
    if any(m in ATTENTION_METHODS for m in explain_methods):
        activations += tokens * tokens * cfg.num_heads * cfg.depth * _BYTES
    if any(m in GRADIENT_METHODS for m in explain_methods):
        activations *= 3  # the backward pass keeps the forward's activations and their gradients
    return int(outputs + activations * batch_windows + image_shape[0] * voxels * _BYTES * 2)


def _window_outputs(model: Medformer, windows: Tensor, domain: Domain, tasks: Sequence[str], attention: bool = False,
                    probe: GradCamProbe | None = None, grad_task: str | None = None) -> tuple[dict, list[Tensor] | None]:
    """The tasks' predictions for a batch of windows and, with ``attention``, each block's attention from the
    same pass (what the attention maps read); with a Grad-CAM ``probe`` the pass keeps what it needs (the
    prediction of ``grad_task``, the one explained, then carries gradients: detach what you keep)."""
    with torch.set_grad_enabled(probe is not None), (probe if probe is not None else contextlib.nullcontext()):
        out = model(Batch.from_images(list(windows), [domain] * len(windows)), tasks=list(tasks), return_attention=attention,
                    grad_tasks=[grad_task] if probe is not None else None)
    return out.predictions, [a.detach() for a in block_attentions(out)] if attention else None


def infer_image(model: Medformer, image, domain: Domain, **options) -> ImageInference:
    """Run every task (and the asked explanations) on ``image``; see :func:`iter_infer_image` for options."""
    steps = iter_infer_image(model, image, domain, **options)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def iter_infer_image(model: Medformer, image, domain: Domain, tasks: Sequence[str] | None = None,
                     explain_methods: Sequence[str] = (), explain_task: str | None = None,
                     explain_options: Mapping[str, dict] | None = None,
                     window: int | Sequence[int] | None = None, overlap: float | None = None,
                     max_tokens: int | None = None, batch_windows: int | None = None, normalize: bool = True,
                     box_threshold: float | None = None, device="cpu") -> Iterator[tuple[int, int]]:
    """Checks the arguments, then returns a generator that yields ``(windows done, total)`` and returns
    the :class:`ImageInference`.

    Run ``tasks`` (default: every task that applies to ``domain``) and explanation maps on ``image``,
    ``(C, *spatial)`` in the intensities of its modality (normalised here as in training unless
    ``normalize=False``). ``window`` is the sliding window in pixels (a multiple of the patch size); by
    default the whole image when it has at most ``max_tokens`` tokens (default: the training token budget
    of ``device``), else the largest cube that does; neighbouring windows overlap by ``overlap`` of their
    side (default :data:`DEFAULT_OVERLAP` of the image's dimensionality). ``batch_windows`` windows go
    through the model at once (default: :func:`windows_per_batch`). A box needs a score of ``box_threshold`` (default: the
    model's calibrated threshold per task, :class:`~medexplore.models.InferenceDefaults`, else 0.5); a
    two-class mask with a calibrated threshold marks the pixels whose foreground probability reaches it.
    With a calibrated region threshold, a mask keeps the connected regions whose mean probability reaches
    it, and of at least its calibrated size (pixels, per dimensionality); a detection task that calibration
    paired with a mask task reads its boxes off that mask's kept regions (:mod:`medexplore.models.findings`).
    ``explain_methods`` are names from :data:`ATTRIBUTION_METHODS`; gradient methods explain
    ``explain_task``; ``explain_options`` passes options per method (e.g. ``{"attention": {"block": 3,
    "head": 0}}``). Stop iterating (a GUI's cancel) and nothing is computed further; bad arguments
    raise here, before any step.
    """
    if overlap is not None and not 0 <= overlap < 1:
        raise UserError(f"overlap must be in [0, 1), got {overlap}")
    if box_threshold is not None and not 0 <= box_threshold <= 1:
        raise UserError(f"box_threshold must be in [0, 1], got {box_threshold}")
    if batch_windows is not None and (isinstance(batch_windows, bool) or not isinstance(batch_windows, int)
                                      or batch_windows < 1):
        raise UserError(f"batch_windows must be a positive integer, got {batch_windows!r}")
    unknown = [m for m in explain_methods if m not in ATTRIBUTION_METHODS]
    if unknown:
        raise UserError(f"unknown explanation {unknown[0]!r}; choose from {ATTRIBUTION_METHODS}")
    applicable = [n for n, s in model.tasks.items() if s.applies_to(domain)]
    tasks = applicable if tasks is None else list(tasks)
    for name in tasks:
        if name not in applicable:
            raise UserError(f"task {name!r} does not apply to {domain} (tasks here: {applicable})")
    if any(m in GRADIENT_METHODS for m in explain_methods) and explain_task not in applicable:
        raise UserError(f"gradient explanations need explain_task, one of {applicable}; got {explain_task!r}")
    cam_options = dict((explain_options or {}).get("grad_cam", {}))
    unknown = sorted(set(cam_options) - {"block", "target"})
    if unknown:
        raise UserError(f"explain_options['grad_cam']: unknown option(s) {unknown}; it takes block and target")
    probe = GradCamProbe(model, cam_options.get("block", -1)) if "grad_cam" in explain_methods else None
    image = prepare_image(image, domain, normalize=False)
    if image.dim() - 1 not in model.config.patch_sizes:
        raise UserError(f"the image: expected (C, H, W) or (C, D, H, W), got shape {tuple(image.shape)}")
    roi = window_for(model, tuple(image.shape[1:]), window, max_tokens, device)
    overlap = DEFAULT_OVERLAP[len(roi)] if overlap is None else overlap
    model.patch_embed.grid((image.shape[0], *roi), where="the image")  # channels, and what the stem needs
    if normalize:
        image = normalize_intensity(image, domain.modality)
    batch_windows = windows_per_batch(model, roi) if batch_windows is None else batch_windows
    pairs = {boxes: mask for boxes, mask in model.inference.paired_masks.items()
             if (boxes in tasks or mask in tasks) and boxes in applicable and mask in applicable}
    return _infer_steps(model, image, domain, tasks, pairs, explain_methods, explain_task, explain_options, probe,
                        cam_options.get("target"), roi, overlap, batch_windows, box_threshold, device)


def _infer_steps(model, image, domain, tasks, pairs, explain_methods, explain_task, explain_options, probe, cam_target,
                 roi, overlap, batch_windows, box_threshold, device) -> Iterator[tuple[int, int]]:
    spatial = tuple(image.shape[1:])
    model.eval().to(device)
    reported, tasks = tasks, list(dict.fromkeys([*tasks, *pairs.values()]))  # paired boxes come from their mask
    kinds = {n: model.tasks[n].kind for n in tasks}
    outputs = {n: kind_entry(kinds[n]).output for n in tasks}
    seg_tasks = [n for n in tasks if outputs[n] == "mask"]
    vector_tasks = [n for n in tasks if outputs[n] == "vector"]
    det_tasks = [n for n in tasks if outputs[n] == "boxes" and n not in pairs]
    thresholds = {n: model.inference.box_threshold(n) if box_threshold is None else box_threshold
                  for n in [*det_tasks, *pairs]}
    reads_attention = any(m in ATTENTION_METHODS for m in explain_methods)
    map_names = [m if m in ATTENTION_METHODS else f"{m}:{explain_task}" for m in explain_methods]
    channels = {**{n: model.tasks[n].num_outputs for n in seg_tasks}, **{k: 1 for k in map_names}}
    blender = WindowBlender(spatial, roi, overlap, channels)
    vector_sums = {n: 0.0 for n in vector_tasks}
    found_boxes: dict[str, list] = {n: [] for n in det_tasks}
    yield 0, blender.num_windows
    pass_tasks = list(dict.fromkeys([*(n for n in tasks if n not in pairs), *([explain_task] if probe else [])]))
    for done, starts in blender.batches(batch_windows):
        windows = torch.stack([image[(slice(None), *blender.region(s))] for s in starts]).to(device)
        windows = blender.pad(windows)
        predictions, attentions = _window_outputs(model, windows, domain, pass_tasks, attention=reads_attention,
                                                  probe=probe, grad_task=explain_task)
        spatial_out = {}
        if probe is not None:  # Grad-CAM from the pass just run: its tokens, its predictions' targets
            spatial_out[f"grad_cam:{explain_task}"] = torch.from_numpy(np.stack(probe.maps(
                explain_task, predictions[explain_task], model.patch_embed.grid(tuple(windows.shape[1:])),
                tuple(windows.shape[2:]), cam_target)))[:, None]
            predictions = _detached(predictions)
        for name in seg_tasks:
            per_sample = SegmentationHead.per_sample(predictions[name], len(windows))
            spatial_out[name] = torch.stack([p.float().softmax(0) for p in per_sample]).cpu()
        for name in vector_tasks:
            vector_sums[name] = vector_sums[name] + task_scores(kinds[name], predictions[name]).sum(0).cpu()
        for name in det_tasks:
            scores = predictions[name]["logits"].sigmoid().float().cpu()
            for boxes, score, start in zip(predictions[name]["boxes"], scores, starts):
                if boxes is not None:
                    keep = score >= thresholds[name]
                    offset = torch.tensor(start, dtype=torch.float32).repeat(2)
                    found_boxes[name].append((boxes.float().cpu()[keep] + offset, score[keep]))
        targets = default_targets(model, explain_task, predictions[explain_task]) if explain_task in predictions else None
        for method, key in zip(explain_methods, map_names):
            if method == "grad_cam":
                continue
            options = dict((explain_options or {}).get(method, {}))
            if method in GRADIENT_METHODS and targets is not None:  # the targets of the pass just run
                options.setdefault("target", targets)
            if method in ATTENTION_METHODS:  # the attention of the pass just run
                options["attentions"] = attentions
            maps = explain_images(model, windows, domain, method, task=explain_task, device=device, **options)
            spatial_out[key] = torch.from_numpy(np.stack(maps))[:, None]
        blender.add(starts, spatial_out)
        yield done, blender.num_windows
    blended = blender.result()
    result = ImageInference(window=roi, num_windows=blender.num_windows)
    defaults = model.inference
    dims = f"{len(spatial)}d"
    regions = {n: mask_regions(blended[n][1].numpy(), defaults.mask_threshold(n))  # labelled once per mask
               for n in seg_tasks
               if n in defaults.region_thresholds or n in defaults.region_min_sizes or n in pairs.values()}
    for name in seg_tasks:
        threshold = defaults.mask_thresholds.get(name)
        if name in defaults.region_thresholds or name in defaults.region_min_sizes:
            labels = regions[name].mask(defaults.region_thresholds.get(name, 0.0), defaults.region_min_size(name, dims))
        else:
            labels = (_first_argmax(blended[name]) if threshold is None else (blended[name][1] >= threshold)).numpy()
        result.segmentations[name] = labels.astype(np.int32)
    for name, mask in pairs.items():
        result.boxes[name] = _merge_boxes([regions[mask].scored_boxes(thresholds[name],
                                                                   defaults.region_min_size(mask, dims))], spatial)
    for key in map_names:
        result.maps[key] = blended[key][0].numpy()
    for name in vector_tasks:
        result.scores[name] = (vector_sums[name] / blender.num_windows).numpy()
    for name in det_tasks:
        result.boxes[name] = _merge_boxes(found_boxes[name], spatial)
    result.segmentations = {n: m for n, m in result.segmentations.items() if n in reported}
    result.boxes = {n: b for n, b in result.boxes.items() if n in reported}
    return result


def _first_argmax(values: Tensor) -> Tensor:
    """``values.argmax(0)`` (ties to the first channel) for a few channels over a large image, one elementwise
    pass per channel: torch's reduction over the outer dimension of a 4 x 128^3 volume is 8x slower."""
    if torch.isnan(values).any():
        return values.argmax(0)
    best, labels = values[0].clone(), torch.zeros_like(values[0], dtype=torch.int64)
    for channel in range(1, values.shape[0]):
        better = values[channel] > best
        labels.masked_fill_(better, channel)
        best = torch.maximum(best, values[channel])
    return labels


def _detached(predictions):
    """Predictions (tensors, or dicts / lists of them, as the heads return) without their autograd graph."""
    if isinstance(predictions, Tensor):
        return predictions.detach()
    if isinstance(predictions, dict):
        return {k: _detached(v) for k, v in predictions.items()}
    if isinstance(predictions, (list, tuple)):
        return type(predictions)(_detached(v) for v in predictions)
    return predictions


def _merge_boxes(found: list[tuple[Tensor, Tensor]], spatial: Sequence[int], iou: float = 0.3
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of every window clipped to the image, then greedy non-maximum suppression."""
    dims = len(spatial)
    if not found or not sum(len(s) for _, s in found):
        return np.zeros((0, 2 * dims), np.float32), np.zeros(0, np.float32)
    size = torch.tensor(list(spatial) * 2, dtype=torch.float32)
    boxes = torch.minimum(torch.cat([b for b, _ in found]).clamp_min(0), size)
    scores = torch.cat([s for _, s in found])
    order = scores.argsort(descending=True)
    boxes, scores = boxes[order], scores[order]
    overlaps = box_iou(boxes, boxes)
    keep = torch.ones(len(boxes), dtype=torch.bool)
    for i in range(len(boxes)):
        if keep[i]:
            keep[i + 1:] &= overlaps[i, i + 1:] < iou
    return boxes[keep].numpy(), scores[keep].numpy()
