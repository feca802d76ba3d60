"""Exponential moving average of a model's weights (``train.ema_decay``), the weights a run evaluates."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import UserError

__all__ = ["WeightAverage"]


class WeightAverage:
    """``shadow = decay * shadow + (1 - decay) * weight`` after every optimizer step, for every floating-point
    parameter and buffer of ``model``; integer buffers are copied. The average warms up as in timm's
    ``ModelEmaV2``-style schedules: the effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n``
    updates, so early weights do not dominate a short run."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise UserError(f"train.ema_decay must be in (0, 1) when used, got {decay}")
        self.model, self.decay, self.updates = model, decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[name].lerp_(value.detach(), 1 - decay)
            else:
                self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its own weights again after it."""
        own = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.shadow)
        try:
            yield self.model
        finally:
            self.model.load_state_dict(own)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.to(self.shadow[k].device) for k, v in state["shadow"].items()}
        self.updates = int(state["updates"])
