"""Training memory of one step of an adapted model, the same way on CPU and GPU."""
from __future__ import annotations

import torch

from ..models.medformer import Medformer
from ..models.packing import Batch

__all__ = ["step_memory"]


def step_memory(model: Medformer, batch: Batch, packing: str = "grouped") -> dict[str, int]:
    """Bytes one AdamW training step needs: weights, gradients and optimizer moments of the trainable
    parameters, and the activations autograd keeps for the backward pass.

    Activations are measured with saved-tensor hooks (each storage counted once), so the figure is
    exact and device-independent; on CUDA ``cuda_peak`` (allocator high-water mark) is added. The
    model's gradients are cleared afterwards; its weights are not changed.
    """
    device = next(model.parameters()).device
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(batch.to(device), packing=packing)
            loss, _ = model.compute_loss(out, batch.to(device))
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    result = {"weights": weights, "gradients": trainable, "optimizer": 2 * trainable,
              "activations": sum(saved.values())}
    result["total"] = sum(result.values())
    if device.type == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    return result
