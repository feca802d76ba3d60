"""Savings of the interactive inference path, each against its absence in the same run (the two
alternated, so that the machine's noise hits both alike):

1. channels-last convolutions (segmentation decoders; :mod:`medexplore.models.layout`) against
   PyTorch's default layout: ``infer_image`` of the shipped model (every task, default options: what
   napari's Run does) on the 128^3 volume of ``bench_napari.py`` and on the MNI152 sample, and a training
   step (forward, backward, AdamW) of the same model on 4 crops of 64^3 and of the MedMNIST recipe's model on
   32 volumes of 28^3;
2. an explanation's pass recording gradients for the explained task's head only (``grad_tasks``) against
   every head recording them: ``infer_image`` with rollout and Grad-CAM of ``lesion`` on the 128^3 volume;
3. the same call's other savings, each against its absence: attention rollout read along its row (vector-matrix
   products, from the last block down) against the full matrix products; and (``infer_image`` without maps)
   the labels of a many-class mask by one elementwise pass per class against ``argmax(0)``;
4. (``--only decoder`` runs just this) the decoders' channel concatenations written straight into the
   channels-last layout against ``torch.cat`` then a reorder: ``infer_image`` on both images;
5. (``--only attention`` runs just this) where attention weights are asked for (rollout), the blocks' output
   computed from those weights against the fused kernel run beside them: ``infer_image`` with rollout and
   Grad-CAM of ``lesion`` on both images;
6. (``--against OTHER`` runs just this) MODEL against another checkpoint (e.g. a candidate with smaller
   decoders): ``infer_image`` with rollout and Grad-CAM of ``lesion`` on both images, the two alternated.

Usage: python benchmarks/bench_inference.py [MODEL] [--reps 3] [--threads N] [--size 128] [--no-sample]
       [--only decoder|attention] [--against OTHER]
(``--size``: the volume's edge; the training crops are half of it)
"""
from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import numpy as np
import torch
from bench_model import alternate

from medexplore.analysis import attribution, inference
from medexplore.analysis.inference import infer_image
from medexplore.data.examples import mni152_t1
from medexplore.models import Batch, Domain, Medformer, create_model, segmentation
from medexplore.models.layout import channels_last, conv_layout
from medexplore.models.packing import TokenLayout, _attention_weights
from medexplore.train.checkpoint import load_model


def _alternate(fn, variants: dict, reps: int) -> dict[str, float]:
    """Median seconds of ``fn`` under each variant (a context manager factory), interleaved by
    ``bench_model.alternate``."""
    def under(variant):
        def run():
            with variant():
                fn()
        return run
    return alternate({name: under(variant) for name, variant in variants.items()}, reps, torch.device("cpu"))


def _every_head_records_gradients():
    """Medformer.forward as it was before ``grad_tasks``: every head of a pass with gradients records them."""
    forward = Medformer.forward

    def every_head(self, *args, grad_tasks=None, **kwargs):
        return forward(self, *args, **kwargs)
    return mock.patch.object(Medformer, "forward", every_head)


def _rollout_full_products(model, images, domain, head_fusion="mean", discard_ratio=0.0, device="cpu",
                           attentions=None):
    """Attention rollout as it was: the full n x n product of every block's attention, then read along its rows."""
    images, grid = attribution._prepare_images(model, images, device)
    p, rollout = model.num_prefix_tokens, None
    for attn in attribution._batch_attentions(model, images, domain, attentions):
        a = attn.mean(1) if head_fusion == "mean" else getattr(attn, head_fusion)(1).values
        if discard_ratio:
            a = torch.where(a >= torch.quantile(a, discard_ratio, dim=-1, keepdim=True), a, torch.zeros_like(a))
        a = a + torch.eye(a.shape[-1])
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    reader = rollout[:, :1] if model.cls_token is not None else rollout[:, p:]
    return attribution._maps_to_images(reader.mean(1)[:, p:], grid, tuple(images.shape[2:]))


def _fused_beside_weights(layout, q, k, v, need_weights=False, varlen=None):
    """``TokenLayout.self_attention`` as it was: the fused kernel gives the output, the weights are computed beside it."""
    outs, weights = [], []
    for seg, *qkv in zip(layout.segments, *(layout.segment_rows(t) for t in (q, k, v))):
        qs, ks, vs = (t.transpose(1, 2) for t in qkv)
        mask = None if seg.key_mask is None else seg.key_mask[:, None, None, :]
        outs.append(seg.from_rows(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
                                  .transpose(1, 2)))
        if need_weights:
            weights.append(_attention_weights(qs, ks, mask))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), weights


LAYOUTS = {"default layout": lambda: conv_layout(False), "channels-last": lambda: conv_layout(True)}
GRADIENTS = {"every head": _every_head_records_gradients, "explained head only": contextlib.nullcontext}
ROLLOUTS = {"full products": lambda: mock.patch.object(attribution, "_rollout", _rollout_full_products),
            "read along its row": contextlib.nullcontext}
CONCATS = {"cat, then reordered": lambda: mock.patch.object(
    segmentation, "concat_channels", lambda tensors: channels_last(torch.cat(list(tensors), 1))),
    "one-pass concat": contextlib.nullcontext}
ATTENTION = {"fused kernel beside the weights": lambda: mock.patch.object(
    TokenLayout, "self_attention", _fused_beside_weights), "output from the weights": contextlib.nullcontext}
ARGMAX = {"argmax(0)": lambda: mock.patch.object(inference, "_first_argmax", lambda values: values.argmax(0)),
          "a pass per class": contextlib.nullcontext}


def _explained(model, image, domain: Domain):
    """What Run does with rollout and Grad-CAM of ``lesion`` ticked."""
    return infer_image(model, image, domain, explain_methods=("rollout", "grad_cam"), explain_task="lesion")


def _loss(predictions) -> torch.Tensor:
    """A scalar that reaches every output (a stand-in for the tasks' losses: the layout changes no loss)."""
    if isinstance(predictions, torch.Tensor) and predictions.requires_grad:
        return predictions.float().pow(2).mean()
    if isinstance(predictions, (dict, list, tuple)):
        values = predictions.values() if isinstance(predictions, dict) else predictions
        return sum((_loss(v) for v in values), torch.zeros(()))
    return torch.zeros(())  # sample ids, counts, absent outputs


def _train_step(model, images: list[torch.Tensor], domain: Domain, tasks: list[str]):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = Batch.from_images(images, [domain] * len(images))

    def step():
        optimizer.zero_grad(set_to_none=True)
        _loss(model(batch, tasks=tasks).predictions).backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="medformer-medmnist-embedded-v5")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--size", type=int, default=128, help="edge of the random volume (a multiple of 8)")
    parser.add_argument("--no-sample", dest="sample", action="store_false", help="leave out the MNI152 sample")
    parser.add_argument("--only", choices=["decoder", "attention"], help="only item 4 or item 5 above")
    parser.add_argument("--against", metavar="OTHER", help="a checkpoint or shipped name timed against MODEL")
    args = parser.parse_args()
    if args.reps < 1 or args.size < 16 or args.size % 8:
        parser.error(f"--reps must be >= 1 and --size a multiple of 8 from 16, got {args.reps}, {args.size}")
    if args.against == args.model:
        parser.error(f"--against names MODEL itself ({args.model}); give another checkpoint")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    brain = Domain("3d", "mri", "brain")
    rng = np.random.default_rng(0)
    edge, crop = args.size, args.size // 2
    volume = rng.normal(size=(1, edge, edge, edge)).astype(np.float32)
    images = {f"{edge}^3": volume, **({"MNI152": mni152_t1().image} if args.sample else {})}
    rows = []
    if args.against:
        models = {args.model: model.eval(), args.against: load_model(args.against)[0].eval()}
        for name, image in images.items():
            calls = {label: (lambda m=m, image=image: _explained(m, image, brain)) for label, m in models.items()}
            rows.append((f"infer_image + rollout + Grad-CAM of lesion, {name}",
                         alternate(calls, args.reps, torch.device("cpu"))))
        _print(rows, args.reps)
        return
    if args.only == "attention":
        for name, image in images.items():
            rows.append((f"infer_image + rollout + Grad-CAM of lesion, {name}", _alternate(
                lambda: _explained(model, image, brain), ATTENTION, args.reps)))
        _print(rows, args.reps)
        return
    with torch.no_grad():
        for name, image in images.items():
            rows.append((f"infer_image, {name}", _alternate(lambda: infer_image(model, image, brain), CONCATS, args.reps)))
    if args.only:
        _print(rows, args.reps)
        return
    with torch.no_grad():
        for name, image in images.items():
            rows.append((f"infer_image, {name}", _alternate(lambda: infer_image(model, image, brain), LAYOUTS, args.reps)))
    tasks_3d = [n for n, s in model.tasks.items() if s.applies_to(brain)]
    crops = [torch.from_numpy(rng.normal(size=(1, crop, crop, crop)).astype(np.float32)) for _ in range(4)]
    rows.append((f"train step, 4 x {crop}^3, " + ", ".join(tasks_3d),
                 _alternate(_train_step(model.train(), crops, brain, tasks_3d), LAYOUTS, args.reps)))
    model.eval()
    torch.manual_seed(0)
    recipe = create_model("medformer_tiny", tasks=[{"name": "adrenal", "kind": "binary", "num_outputs": 1,
                                                    "dimensionalities": ["3d"]}],
                          patch_size=4, stem="conv", stem_norm="instance", layer_scale=0.1, depth=6,
                          embed_dim=128, num_heads=4).train()
    small = [torch.from_numpy(rng.normal(size=(1, 28, 28, 28)).astype(np.float32)) for _ in range(32)]
    rows.append(("train step, 32 x 28^3, the MedMNIST recipe's model", _alternate(
        _train_step(recipe, small, Domain("3d", "ct", "adrenal"), ["adrenal"]), LAYOUTS, args.reps)))
    for saving in (GRADIENTS, ROLLOUTS):
        rows.append((f"infer_image + rollout + Grad-CAM of lesion, {edge}^3", _alternate(
            lambda: _explained(model, volume, brain), saving, args.reps)))
    with torch.no_grad():
        rows.append((f"infer_image, {edge}^3, tissue labels", _alternate(
            lambda: infer_image(model, volume, brain), ARGMAX, args.reps)))
    _print(rows, args.reps)


def _print(rows: list, reps: int) -> None:
    print(f"threads {torch.get_num_threads()}, median seconds of {reps} alternated runs")
    print("| case | reference | s | faster variant | s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, t in rows:
        (ref, ref_s), (new, new_s) = t.items()
        print(f"| {name} | {ref} | {ref_s:.2f} | {new} | {new_s:.2f} | {ref_s / new_s:.2f}x |")


if __name__ == "__main__":
    main()
