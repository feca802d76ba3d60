"""What a run minimises: the multitask supervised loss, or VICReg between two views of every image.

An objective owns whatever trains beside the model (VICReg's expander, a loss balancer) and turns a
batch into ``(loss, named terms)``; the :class:`~medexplore.train.engine.Trainer` does the rest.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.transforms import Augment
from ..errors import UserError
from ..models.kinds import kind_entry
from ..models.medformer import Medformer
from ..models.packing import Batch
from ..ssl import Expander, TwoViews, VICRegLoss
from .balancing import BALANCER_LR_SCALE, make_balancer
from .config import TrainConfig

__all__ = ["Objective", "SupervisedObjective", "VICRegObjective", "make_objective"]


def _step_generator(seed: int, step: int, rank: int, salt: int = 0) -> torch.Generator:
    """Random draws of one step, reproducible from (seed, step, rank) whatever ran before (resume-safe)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank + salt)


class Objective:
    """Base: no modules of its own, no training state. ``forward`` is the model as called for a batch
    (DDP- or compile-wrapped)."""

    def __init__(self, model: Medformer, config: TrainConfig, rank: int = 0):
        self.model, self.config, self.rank = model, config, rank

    def modules(self) -> list[nn.Module]:
        """Modules trained beside the model (their parameters join the optimizer's first two groups)."""
        return []

    def param_groups(self) -> list[dict]:
        """Optimizer groups of their own (learning rate, no weight decay), not clipped with the model's."""
        return []

    def to(self, device: torch.device) -> "Objective":
        for module in self.modules() + self._balancers():
            module.to(device)
        return self

    def _balancers(self) -> list[nn.Module]:
        return []

    def distribute(self, wrap) -> None:
        """Wrap the objective's own modules for DDP (``wrap(module) -> module``)."""

    def train(self) -> None:
        for module in self.modules():
            module.train()

    def loss(self, forward, batch: Batch, step: int, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimizer step."""

    # checkpoints: weights saved beside the model's, and training state for an exact resume
    def extra_weights(self) -> dict | None:
        return None

    def load_extra_weights(self, weights: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def meta(self) -> dict:
        """What the run's ``meta.json`` records of the objective."""
        return {}


class SupervisedObjective(Objective):
    """Every task's masked loss on label-consistently augmented images (``train.augment``), combined with
    the TaskSpec weights or a learned balancer (``train.loss_balance``). ``prior_offsets``: per class task,
    what the loss adds to its raw output because the sampler changed its class shares
    (:mod:`medexplore.train.priors`)."""

    def __init__(self, model: Medformer, config: TrainConfig, rank: int = 0, distributed: bool = False,
                 prior_offsets: dict[str, Tensor] | None = None):
        super().__init__(model, config, rank)
        self.prior_offsets = dict(prior_offsets or {})
        unknown = sorted(set(self.prior_offsets) - set(model.tasks))
        if unknown:
            raise UserError(f"prior offsets for unknown task(s) {unknown}; the model has {sorted(model.tasks)}")
        self.augment = Augment() if config.augment else None
        self.balancer = make_balancer(config.loss_balance, {n: t.weight for n, t in model.tasks.items()})
        if self.balancer is not None and distributed:
            raise UserError(f"train.loss_balance {config.loss_balance!r} is single-process only (its weights "
                             "would differ between processes); use fixed under DDP")

    def _balancers(self) -> list[nn.Module]:
        return [self.balancer] if self.balancer is not None else []

    def param_groups(self) -> list[dict]:
        return [{"params": list(b.parameters()), "weight_decay": 0.0, "lr": self.config.lr * BALANCER_LR_SCALE}
                for b in self._balancers()]

    def _augmented(self, batch: Batch, step: int) -> Batch:
        """``batch`` with every image augmented and its spatial labels moved along."""
        g = _step_generator(self.config.seed, step, self.rank, salt=17)
        outputs = {name: kind_entry(t.kind).output for name, t in self.model.tasks.items()}
        spatial = {name: output for name, output in outputs.items() if output != "vector"}
        targets = {name: list(labels) for name, labels in batch.targets.items()}
        groups = []
        for images, ids in zip(batch.groups, batch.group_samples):
            rows = []
            for image, s in zip(images, ids.tolist()):
                labels = {name: targets[name][s] for name in targets}
                image, labels = self.augment(image, labels, spatial, g)
                rows.append(image)
                for name, value in labels.items():
                    targets[name][s] = value
            groups.append(torch.stack(rows))
        return Batch(groups, batch.group_samples, batch.domains, targets, batch.meta)

    def loss(self, forward, batch: Batch, step: int, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        if self.augment is not None:
            batch = self._augmented(batch, step)
        batch = batch.to(device, non_blocking=True)
        out = forward(batch, packing=self.config.packing, tasks=self.model.labelled_tasks(batch))
        for name, offset in self.prior_offsets.items():
            if name in out.predictions:
                out.predictions[name] = out.predictions[name] + offset.to(out.predictions[name].device)
        total, per_task = self.model.compute_loss(out, batch, self.config.label_smoothing)
        if self.balancer is not None and per_task:
            shared = [p for p in self.model.blocks[-1].parameters() if p.requires_grad]
            total = self.balancer.combine(per_task, shared)
        return total, per_task

    def after_step(self) -> None:
        if self.balancer is not None:
            self.balancer.after_step()

    def state_dict(self) -> dict:
        return {"balancer": self.balancer.state_dict()} if self.balancer is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.balancer is not None:
            self.balancer.load_state_dict(state["balancer"])

    def meta(self) -> dict:
        return {"loss_weights": self.balancer.weights()} if self.balancer is not None else {}


class VICRegObjective(Objective):
    """VICReg between the pooled embeddings of two random views of every image, through an expander
    (saved beside the model's weights)."""

    def __init__(self, model: Medformer, config: TrainConfig, rank: int = 0):
        super().__init__(model, config, rank)
        self.expander = Expander(model.config.embed_dim, config.expander)
        self.forward_expander: nn.Module = self.expander
        self.vicreg = VICRegLoss()
        self.views = TwoViews()

    def modules(self) -> list[nn.Module]:
        return [self.expander]

    def distribute(self, wrap) -> None:
        self.forward_expander = wrap(self.expander)

    def loss(self, forward, batch: Batch, step: int, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        g = _step_generator(self.config.seed, step, self.rank)
        images = [img for group in batch.groups for img in group.cpu()]
        order = [int(i) for ids in batch.group_samples for i in ids]
        domains = [batch.domains[i] for i in order]
        views = [self.views(img, g) for img in images]
        v1 = Batch.from_images([a for a, _ in views], domains).to(device)
        v2 = Batch.from_images([b for _, b in views], domains).to(device)
        z1 = self.forward_expander(forward(v1, packing=self.config.packing).embedding)
        z2 = self.forward_expander(forward(v2, packing=self.config.packing).embedding)
        terms = self.vicreg.terms(z1.float(), z2.float())
        return self.vicreg.combine(terms), terms

    def extra_weights(self) -> dict:
        return self.expander.state_dict()

    def load_extra_weights(self, weights: dict) -> None:
        self.expander.load_state_dict(weights)


def make_objective(model: Medformer, config: TrainConfig, rank: int = 0, distributed: bool = False,
                   prior_offsets: dict[str, Tensor] | None = None) -> Objective:
    """The objective ``train.mode`` names (``prior_offsets``: supervised only, see :class:`SupervisedObjective`)."""
    if config.mode == "vicreg":
        return VICRegObjective(model, config, rank)
    return SupervisedObjective(model, config, rank, distributed, prior_offsets)
