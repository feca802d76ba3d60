"""The parts a :class:`~medexplore.train.engine.Trainer` is built from: optimizer, learning-rate
schedule, batch sampler and the DDP wrapper, each a function of the config."""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.sampling import WeightedBatchSampler, balanced_weights, labels_of
from ..errors import UserError
from ..models.kinds import kind_entry
from ..models.tasks import TaskSpec
from .config import TrainConfig

__all__ = ["cosine_schedule", "build_optimizer", "build_scheduler", "build_sampler", "sampling_keys", "sampling_weights", "balanced_tasks",
           "wrap_ddp"]


def cosine_schedule(total: int, warmup: int, min_fraction: float) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over ``warmup`` steps, then cosine down to ``min_fraction``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_optimizer(modules: Sequence[nn.Module], config: TrainConfig, extra_groups: Sequence[dict] = ()
                    ) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``modules``: weight decay on matrices (group 0), none on
    vectors (group 1); ``extra_groups`` follow (e.g. a loss balancer's, with its own learning rate)."""
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}, *extra_groups]
    return torch.optim.AdamW(groups, lr=config.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    warmup = int(config.warmup_fraction * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(total_steps, warmup, config.min_lr_fraction))


def _sources(dataset: Dataset, balance: str) -> list:
    source_of = getattr(dataset, "source_of", None)
    if source_of is None:
        raise UserError(f"train.balance={balance} needs a MixedDataset (several sources)")
    return [source_of(i) for i in range(len(dataset))]


def balanced_tasks(tasks: dict[str, TaskSpec]) -> set[str]:
    """The tasks whose classes ``train.balance`` may re-weight: those whose kind undoes the re-weighting
    exactly (a ``prior_offset``: binary and multiclass; not ordinal grades, regression or vector labels)."""
    return {name for name, spec in tasks.items() if kind_entry(spec.kind).prior_offset is not None}


def _label_keys(dataset: Dataset, tasks: dict[str, TaskSpec]) -> list:
    """Each sample's labels of the :func:`balanced_tasks` as one key."""
    names = balanced_tasks(tasks)
    keys = []
    for i in range(len(dataset)):
        labels = labels_of(dataset, i)
        keys.append(tuple(sorted((k, int(torch.as_tensor(v).reshape(-1)[0])) for k, v in labels.items()
                                 if k in names and v is not None)))
    return keys


def sampling_keys(dataset: Dataset, balance: str, tasks: dict[str, TaskSpec]) -> list:
    """What ``train.balance`` makes equally likely, per sample: its source dataset, its class labels (of the
    :func:`balanced_tasks`), or (for ``source_label``) the pair."""
    if balance == "source":
        return _sources(dataset, balance)
    if balance in ("label", "source_label") and not balanced_tasks(tasks):
        kinds = sorted({spec.kind for spec in tasks.values()})
        raise UserError(f"train.balance={balance}: no task has a kind whose classes can be re-weighted "
                        f"(binary or multiclass); the tasks' kinds are {', '.join(kinds)}. Use train.balance=source or none")
    if balance == "label":
        return _label_keys(dataset, tasks)
    if balance == "source_label":
        return list(zip(_sources(dataset, balance), _label_keys(dataset, tasks)))
    raise UserError(f"sampling_keys: no keys for train.balance={balance!r}")


def sampling_weights(dataset: Dataset, balance: str, tasks: dict[str, TaskSpec], power: float = 1.0) -> torch.Tensor | None:
    """Per-sample draw probabilities for ``train.balance`` over a model's ``tasks`` (None for ``none``: a plain
    shuffle). ``source_label``: every source equally likely, and within each source every label key.

    ``power`` (``train.balance_power``) tempers the label part: each label key is drawn in proportion to
    ``count ** (1 - power)``, so 1 makes the keys equally likely, 0.5 gives square-root shares and 0 leaves
    the data's shares. Sources stay equally likely whatever ``power``."""
    if not 0 <= power <= 1:
        raise UserError(f"train.balance_power must be in [0, 1], got {power}")
    if balance == "none":
        return None
    keys = sampling_keys(dataset, balance, tasks)
    if balance == "source":
        return balanced_weights(keys)
    shares = {key: n ** (1 - power) for key, n in Counter(keys).items()}
    if balance == "source_label":  # each source's label keys share that source's equal part
        per_source = Counter()
        for (source, _), share in shares.items():
            per_source[source] += share
        shares = {key: share / per_source[key[0]] for key, share in shares.items()}
    return balanced_weights(keys, shares)


def build_sampler(dataset: Dataset, config: TrainConfig, steps_per_epoch: int, weights: torch.Tensor | None,
                  rank: int = 0, world: int = 1) -> WeightedBatchSampler:
    """Micro-batches of this rank's share, ``steps_per_epoch * accum_steps`` per epoch, drawn by ``weights``
    (:func:`sampling_weights`)."""
    micro = config.batch_size // config.accum_steps
    if micro % world:
        raise UserError(f"micro-batch {micro} is not divisible by {world} processes")
    return WeightedBatchSampler(len(dataset), micro, weights, num_batches=steps_per_epoch * config.accum_steps,
                                seed=config.seed, rank=rank, world_size=world)


def wrap_ddp(module: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
    """``module`` under DistributedDataParallel, on ``device`` (its CUDA index when there is one)."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, find_unused_parameters=find_unused, device_ids=ids)
