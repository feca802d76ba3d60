"""Task-loss balancing (``train.loss_balance``): fixed weights, uncertainty weighting, GradNorm.

- ``fixed``: each task's ``TaskSpec.weight`` (the model's own ``compute_loss``).
- ``uncertainty`` (Kendall, Gal & Cipolla 2018): a learned log-variance ``s_t`` per task;
  loss = sum_t w_t (exp(-s_t) L_t + s_t), so noisy tasks are down-weighted and ``s_t`` cannot run off.
- ``gradnorm`` (Chen et al. 2018): learned task weights ``w_t`` whose gradient norms at the last
  shared block are pulled toward the mean norm times (relative inverse training rate) ** alpha;
  the weights are renormalised to sum to the number of tasks after every step.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UserError

__all__ = ["LOSS_BALANCES", "BALANCER_LR_SCALE", "LossBalancer", "UncertaintyWeighting", "GradNorm", "make_balancer"]

LOSS_BALANCES = ("fixed", "uncertainty", "gradnorm")
BALANCER_LR_SCALE = 10.0  # the balancer's few parameters learn at 10x train.lr (GradNorm's weights move too slowly otherwise)


class LossBalancer(nn.Module):
    """Combines per-task losses into the one loss the model's parameters descend (``fixed`` needs none:
    the model's ``compute_loss`` already applies the TaskSpec weights)."""

    def __init__(self, task_weights: dict[str, float]):
        super().__init__()
        self.tasks = list(task_weights)
        self.register_buffer("spec_weights", torch.tensor([float(w) for w in task_weights.values()]))

    def combine(self, per_task: dict[str, Tensor], shared: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after the optimizer step."""

    def weights(self) -> dict[str, float]:
        """The current effective weight of each task (for logs)."""
        return dict(zip(self.tasks, self.spec_weights.tolist()))


class UncertaintyWeighting(LossBalancer):
    def __init__(self, task_weights):
        super().__init__(task_weights)
        self.log_variance = nn.Parameter(torch.zeros(len(self.tasks)))

    def combine(self, per_task, shared):
        total = 0.0
        for t, loss in per_task.items():
            k = self.tasks.index(t)
            total = total + self.spec_weights[k] * (torch.exp(-self.log_variance[k]) * loss + self.log_variance[k])
        return total

    def weights(self):
        return {t: float(w * torch.exp(-s)) for t, w, s in zip(self.tasks, self.spec_weights, self.log_variance.detach())}


class GradNorm(LossBalancer):
    def __init__(self, task_weights, alpha: float = 1.5):
        super().__init__(task_weights)
        self.alpha = alpha
        self.task_weight = nn.Parameter(torch.ones(len(self.tasks)))
        self.register_buffer("initial_loss", torch.full((len(self.tasks),), float("nan")))

    def combine(self, per_task, shared):
        """The weighted loss for the model (weights detached); the GradNorm loss's gradient goes to the
        weights directly (``task_weight.grad``), so ``backward`` of the result trains the model only."""
        names = list(per_task)
        ks = [self.tasks.index(t) for t in names]
        losses = torch.stack([per_task[t] for t in names])
        with torch.no_grad():
            fresh = torch.isnan(self.initial_loss[ks])
            self.initial_loss[torch.tensor(ks)[fresh]] = losses.detach()[fresh].float()
        if len(names) > 1 and torch.is_grad_enabled():
            norms = []
            for loss in losses:
                grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
                norms.append(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) + 1e-12))
            w = self.task_weight[ks]
            g = w * torch.stack(norms).detach()
            rate = losses.detach().float() / self.initial_loss[ks].clamp_min(1e-8)
            target = (g.mean() * (rate / rate.mean()) ** self.alpha).detach()
            grad = torch.autograd.grad((g - target).abs().sum(), self.task_weight)[0]
            self.task_weight.grad = grad if self.task_weight.grad is None else self.task_weight.grad + grad
        weights = (self.spec_weights[ks] * self.task_weight[ks]).detach()
        return (weights * losses).sum()

    @torch.no_grad()
    def after_step(self):
        self.task_weight.clamp_(min=1e-3)
        self.task_weight.mul_(len(self.tasks) / self.task_weight.sum())

    def weights(self):
        return {t: float(w * v) for t, w, v in zip(self.tasks, self.spec_weights, self.task_weight.detach())}


def make_balancer(name: str, task_weights: dict[str, float]) -> LossBalancer | None:
    """The balancer ``train.loss_balance`` names (None for ``fixed``)."""
    if name not in LOSS_BALANCES:
        raise UserError(f"train.loss_balance must be one of {LOSS_BALANCES}, got {name!r}")
    if name == "fixed":
        return None
    return {"uncertainty": UncertaintyWeighting, "gradnorm": GradNorm}[name](task_weights)
