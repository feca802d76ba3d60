"""Where a model looks: attention rollout, attention maps, captum Integrated Gradients and Grad-CAM.

Every map comes back at the image's resolution (its spatial shape, 2D or 3D), aligned with the
image: a token's value sits at its patch's centre and is interpolated between centres, which is
what ``F.interpolate(..., align_corners=False)`` does for an exact ``patch_size`` upscale.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.sample import Sample
from ..errors import UserError
from ..models.kinds import kind_entry
from ..models.medformer import Medformer
from ..models.packing import Batch

__all__ = ["token_map_to_image", "task_outputs", "attention_rollout", "attention_map", "integrated_gradients",
           "grad_cam", "GradCamProbe", "explain", "explain_images", "default_targets", "block_attentions", "ATTRIBUTION_METHODS",
           "ATTENTION_METHODS", "GRADIENT_METHODS", "ATTRIBUTION_LABELS", "Explanation"]

ATTRIBUTION_LABELS = {"rollout": "attention rollout", "attention": "attention of one block/head",
                      "integrated_gradients": "Integrated Gradients", "grad_cam": "LayerGradCam"}  # method: what a UI shows
ATTRIBUTION_METHODS = tuple(ATTRIBUTION_LABELS)
ATTENTION_METHODS = ("rollout", "attention")  # read the blocks' attention
GRADIENT_METHODS = ("integrated_gradients", "grad_cam")  # explain one task's output


def token_map_to_image(values: Tensor, image_shape: tuple[int, ...]) -> Tensor:
    """Upsample a ``grid``-shaped token map to ``image_shape``, token values at patch centres.

    Example:
        >>> token_map_to_image(torch.tensor([[0., 1.]]), (4, 8))[0].tolist()
        [0.0, 0.0, 0.0, 0.25, 0.75, 1.0, 1.0, 1.0]
    """
    values = torch.as_tensor(values).float()
    if values.dim() != len(image_shape) or values.dim() not in (2, 3):
        raise UserError(f"token map of shape {tuple(values.shape)} does not match image shape {tuple(image_shape)}")
    if any(s % g for s, g in zip(image_shape, values.shape)):
        raise UserError(f"image shape {tuple(image_shape)} is not a multiple of the token grid {tuple(values.shape)}")
    mode = "bilinear" if values.dim() == 2 else "trilinear"
    return F.interpolate(values[None, None], size=tuple(image_shape), mode=mode, align_corners=False)[0, 0]


# ---------------------------------------------------------------------------- task outputs
def task_outputs(model: Medformer, task: str, prediction) -> Tensor:
    """One task's raw prediction as an (N, K) tensor of scalars to explain.

    binary: its logit (K=1); multiclass / multilabel / ordinal / regression: the head's K outputs;
    segmentation: each class' logit averaged over the image; detection: each query's presence logit.
    """
    return kind_entry(model.tasks[task].kind).explain_outputs(prediction)


def _default_target(model: Medformer, task: str, outputs: Tensor) -> int:
    return kind_entry(model.tasks[task].kind).default_target(outputs)


def _default_targets(model: Medformer, task: str, outputs: Tensor) -> list[int]:
    """Per image, the default target of (N, K) task outputs."""
    return [_default_target(model, task, outputs[b:b + 1]) for b in range(outputs.shape[0])]


def default_targets(model: Medformer, task: str, prediction) -> list[int]:
    """Each image's default output to explain (its predicted class, for multiclass), from a prediction of
    ``task`` that the caller already has."""
    return _default_targets(model, task, task_outputs(model, task, prediction))


def _check_task(model: Medformer, task: str, domain) -> None:
    """Refuse a task the model lacks or that does not apply to ``domain``."""
    if task not in model.tasks:
        raise KeyError(f"the model has no task {task!r}; tasks: {sorted(model.tasks)}")
    if not model.tasks[task].applies_to(domain):
        raise UserError(f"task {task!r} does not apply to a {domain.dimensionality} {domain.modality} image")


class _TaskForward(nn.Module):
    """images (N, C, *spatial) -> (N, K) outputs of one task for a fixed domain (what captum calls)."""

    def __init__(self, model: Medformer, task: str, domain):
        super().__init__()
        _check_task(model, task, domain)
        self.model, self.task, self.domain = model, task, domain

    def forward(self, images: Tensor) -> Tensor:
        batch = Batch.from_images(images, [self.domain] * images.shape[0])
        return task_outputs(self.model, self.task, self.model(batch, tasks=[self.task]).predictions[self.task])


def _prepare(model: Medformer, sample: Sample, device) -> tuple[Tensor, tuple[int, ...]]:
    if not isinstance(sample, Sample):
        raise TypeError(f"expected a Sample, got {type(sample).__name__}")
    model.eval().to(device)
    image = sample.image.to(device=device, dtype=model.norm.weight.dtype)
    grid = model.patch_embed.grid(tuple(image.shape), where="the image to explain")
    return image, grid


# ---------------------------------------------------------------------------- attention
def _prepare_images(model: Medformer, images: Tensor, device) -> tuple[Tensor, tuple[int, ...]]:
    """A (B, C, *spatial) batch of same-shape images on the model's device and dtype, and their token grid."""
    images = images.to(device=device, dtype=model.norm.weight.dtype)
    grid = model.patch_embed.grid(tuple(images.shape[1:]), where="the images to explain")
    return images, grid


def block_attentions(output) -> list[Tensor]:
    """Per block, the (B, H, n, n) attention (prefix tokens included) of a forward pass over same-shape images
    run with ``return_attention=True``, as the attention maps read it."""
    return [block[0].float() for block in output.attentions]  # same-shape images: one packed segment


def _batch_attentions(model: Medformer, images: Tensor, domain, attentions: list[Tensor] | None = None) -> list[Tensor]:
    """Per block, the attention of a batch of same-shape images: ``attentions`` when the caller already ran
    the pass (:func:`block_attentions`), else one forward pass without task heads."""
    if attentions is not None:
        if len(attentions) != len(model.blocks) or any(a.shape[0] != len(images) for a in attentions):
            raise UserError(f"attentions: expected {len(model.blocks)} blocks of {len(images)} images")
        return attentions
    with torch.no_grad():
        out = model(Batch.from_images(list(images), [domain] * len(images)), return_attention=True, tasks=[])
    return block_attentions(out)


def _maps_to_images(values: Tensor, grid: tuple[int, ...], image_shape: tuple[int, ...]) -> list[np.ndarray]:
    return [token_map_to_image(v.reshape(grid).cpu(), image_shape).numpy() for v in values]


def _rollout(model: Medformer, images: Tensor, domain, head_fusion: str = "mean", discard_ratio: float = 0.0,
             device="cpu", attentions: list[Tensor] | None = None) -> list[np.ndarray]:
    if head_fusion not in ("mean", "max", "min"):
        raise UserError(f"head_fusion must be mean, max or min, got {head_fusion!r}")
    if not 0 <= discard_ratio < 1:
        raise UserError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    images, grid = _prepare_images(model, images, device)
    p = model.num_prefix_tokens
    layers = []
    for attn in _batch_attentions(model, images, domain, attentions):
        a = getattr(attn, head_fusion)(1)
        a = a.values if head_fusion != "mean" else a
        if discard_ratio:
            cut = torch.quantile(a, discard_ratio, dim=-1, keepdim=True)
            a = torch.where(a >= cut, a, torch.zeros_like(a))
        a = a + torch.eye(a.shape[-1], device=a.device)
        layers.append(a / a.sum(-1, keepdim=True))
    # the rollout A_L ... A_1 is read along one row (the class token's) or the mean of the patch rows: that
    # reader times the product, taken from the last block down, costs vector-matrix products only (n^2, not n^3)
    n = layers[0].shape[-1]
    reader = torch.zeros(len(images), 1, n, device=layers[0].device)
    if model.cls_token is not None:
        reader[..., 0] = 1.0
    else:
        reader[..., p:] = 1.0 / (n - p)
    for a in reversed(layers):
        reader = reader @ a
    return _maps_to_images(reader[:, 0, p:], grid, tuple(images.shape[2:]))


def _attention(model: Medformer, images: Tensor, domain, block: int = -1, head: int | None = None,
               device="cpu", attentions: list[Tensor] | None = None) -> list[np.ndarray]:
    images, grid = _prepare_images(model, images, device)
    attentions = _batch_attentions(model, images, domain, attentions)
    if not -len(attentions) <= block < len(attentions):
        raise UserError(f"block must be in {-len(attentions)}..{len(attentions) - 1}, got {block}")
    attn = attentions[block]
    if head is not None and not 0 <= head < attn.shape[1]:
        raise UserError(f"head must be in 0..{attn.shape[1] - 1}, got {head}")
    a = attn.mean(1) if head is None else attn[:, head]
    p = model.num_prefix_tokens
    return _maps_to_images(a[:, p:, p:].mean(1), grid, tuple(images.shape[2:]))


def attention_rollout(model: Medformer, sample: Sample, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      device="cpu") -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020) of the pooled output over the patches, at image size.

    Each block's head-fused attention plus the identity (the residual), rows renormalised, is
    multiplied through the blocks; the pooled output (class token, or the mean of the patch tokens)
    reads the patches with the resulting weights. ``discard_ratio`` zeroes the weakest links per row.
    """
    image, _ = _prepare(model, sample, device)
    return _rollout(model, image[None], sample.domain, head_fusion, discard_ratio, device)[0]


def attention_map(model: Medformer, sample: Sample, block: int = -1, head: int | None = None,
                  device="cpu") -> np.ndarray:
    """Attention each patch receives in one block (one head, or the mean of heads), at image size."""
    image, _ = _prepare(model, sample, device)
    return _attention(model, image[None], sample.domain, block, head, device)[0]


# ---------------------------------------------------------------------------- captum
def integrated_gradients(model: Medformer, sample: Sample, task: str, target: int | None = None,
                         steps: int = 32, noise_tunnel: bool = True, nt_samples: int = 4, stdevs: float = 0.1,
                         internal_batch_size: int = 16, device="cpu") -> np.ndarray:
    """Integrated Gradients (from a zero image; smoothed by a NoiseTunnel) summed over channels.

    Signed, at image size. ``stdevs`` is relative to the image's intensity spread.
    """
    from captum.attr import IntegratedGradients, NoiseTunnel

    image, _ = _prepare(model, sample, device)
    forward = _TaskForward(model, task, sample.domain)
    inputs = image[None]
    with torch.no_grad():
        target = _default_target(model, task, forward(inputs)) if target is None else target
    method = IntegratedGradients(forward)
    kwargs = {"baselines": torch.zeros_like(inputs), "target": target, "n_steps": steps,
              "internal_batch_size": internal_batch_size}
    if noise_tunnel:
        method = NoiseTunnel(method)
        kwargs.update(nt_type="smoothgrad", nt_samples=nt_samples, nt_samples_batch_size=1,
                      stdevs=float(stdevs * inputs.std().clamp_min(1e-6)))
    attributions = method.attribute(inputs, **kwargs)
    return attributions[0].sum(0).detach().float().cpu().numpy()


class GradCamProbe:
    """Grad-CAM read from a forward pass the caller runs (so a pass that also runs every task can explain one):
    inside ``with probe:`` the pass keeps block ``block``'s tokens; :meth:`maps` then takes the gradient of each
    image's target output with respect to them. The map is captum's ``LayerGradCam`` on that block's patch
    tokens (channel weights: the gradient averaged over the token grid), ReLU'd, at image size.

    Run the pass with gradients enabled; it needs no gradient on the parameters and leaves none there.
    """

    def __init__(self, model: Medformer, block: int = -1):
        if not -len(model.blocks) <= block < len(model.blocks):
            raise UserError(f"block must be in {-len(model.blocks)}..{len(model.blocks) - 1}, got {block}")
        self.model, self.block = model, block
        self.tokens: Tensor | None = None
        self._handle = None

    def _keep(self, module, args, output) -> None:
        self.tokens = output[0]

    def __enter__(self) -> "GradCamProbe":
        self.tokens = None
        self._handle = self.model.blocks[self.block].register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def maps(self, task: str, prediction, grid: tuple[int, ...], image_shape: tuple[int, ...],
             target: int | list[int] | None = None) -> list[np.ndarray]:
        """One map per image of the pass: ``task``'s ``prediction`` from that pass explained at ``target`` (one
        output index for all images or one per image; by default each image's own, :func:`default_targets`)."""
        if self.tokens is None or not self.tokens.requires_grad:
            raise RuntimeError("GradCamProbe.maps needs a forward pass with gradients enabled inside `with probe:`")
        outputs = task_outputs(self.model, task, prediction)
        if target is None:
            target = _default_targets(self.model, task, outputs.detach())
        targets = torch.as_tensor(target if isinstance(target, list) else [target] * len(outputs), device=outputs.device)
        chosen = outputs.gather(1, targets.view(-1, 1)).sum()  # images are independent: one backward for all
        gradients = torch.autograd.grad(chosen, self.tokens)[0]
        p, n = self.model.num_prefix_tokens, int(np.prod(grid))
        tokens = self.tokens.detach().reshape(-1, p + n, self.tokens.shape[-1])[:, p:]
        gradients = gradients.reshape(tokens.shape[0], p + n, -1)[:, p:]
        cam = torch.relu((tokens * gradients.mean(1, keepdim=True)).sum(-1))
        self.tokens = None
        return _maps_to_images(cam, grid, image_shape)


def _grad_cam(model: Medformer, images: Tensor, domain, task: str, target: int | list[int] | None = None,
              block: int = -1, device="cpu") -> list[np.ndarray]:
    images, grid = _prepare_images(model, images, device)
    _check_task(model, task, domain)
    with GradCamProbe(model, block) as probe, torch.enable_grad():
        prediction = model(Batch.from_images(images, [domain] * images.shape[0]), tasks=[task]).predictions[task]
        return probe.maps(task, prediction, grid, tuple(images.shape[2:]), target)


def grad_cam(model: Medformer, sample: Sample, task: str, target: int | None = None, block: int = -1,
             device="cpu") -> np.ndarray:
    """Grad-CAM (as captum's LayerGradCam, :class:`GradCamProbe`) on the patch tokens after ``block``, ReLU'd, at
    image size."""
    image, _ = _prepare(model, sample, device)
    return _grad_cam(model, image[None], sample.domain, task, target, block, device)[0]


@dataclass
class Explanation:
    """One attribution map at image size, with what produced it."""

    values: np.ndarray
    method: str
    task: str | None = None
    target: int | None = None


def explain_images(model: Medformer, images: Tensor, domain, method: str, task: str | None = None,
                   target: int | Sequence[int] | None = None, device="cpu", **options) -> list[np.ndarray]:
    """:func:`explain` for a batch of same-shape images of one domain (e.g. sliding windows): one map per
    image, equal to explaining each alone. Attention maps and Grad-CAM take one pass for the batch;
    Integrated Gradients (already batched over its steps inside captum) runs image by image. ``target``
    is one output index for all images or one per image; by default each image's own (a caller that has
    already run the model passes them and saves Grad-CAM a forward pass). Likewise ``attentions=``
    (:func:`block_attentions` of that pass) saves the attention maps theirs."""
    if method not in ATTRIBUTION_METHODS:
        raise UserError(f"method must be one of {ATTRIBUTION_METHODS}, got {method!r}")
    if method == "rollout":
        return _rollout(model, images, domain, device=device, **options)
    if method == "attention":
        return _attention(model, images, domain, device=device, **options)
    if task is None:
        raise UserError(f"{method} explains one task: pass task= (one of {sorted(model.tasks)})")
    if isinstance(target, Sequence):
        if len(target) != len(images):
            raise UserError(f"target: {len(target)} targets for {len(images)} images")
        target = [int(t) for t in target]
    if method == "grad_cam":
        return _grad_cam(model, images, domain, task, target, device=device, **options)
    targets = target if isinstance(target, list) else [target] * len(images)
    return [integrated_gradients(model, Sample(image, domain), task, t, device=device, **options)
            for image, t in zip(images, targets)]


def explain(model: Medformer, sample: Sample, method: str, task: str | None = None, target: int | None = None,
            device="cpu", **options) -> Explanation:
    """One entry point for front-ends: ``rollout``, ``attention``, ``integrated_gradients`` or ``grad_cam``
    (:func:`explain_images` on a batch of one)."""
    image, _ = _prepare(model, sample, device)
    values = explain_images(model, image[None], sample.domain, method, task, target, device, **options)[0]
    gradient = method in GRADIENT_METHODS
    return Explanation(values, method, task if gradient else None, target if gradient else None)
