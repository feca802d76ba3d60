"""VICReg (Bardes, Ponce & LeCun, 2022): variance-invariance-covariance regularised SSL."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

__all__ = ["VICRegLoss", "Expander", "gather_with_grad", "off_diagonal"]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping gradients (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x))


def off_diagonal(m: Tensor) -> Tensor:
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class VICRegLoss(nn.Module):
    """``sim * MSE(z1, z2) + std * variance + cov * covariance`` over globally gathered embeddings.

    Args:
        sim_coeff, std_coeff, cov_coeff: term weights (25, 25, 1 in the paper).
        eps: added to the variance before the square root.
        gamma: target standard deviation of each dimension.

    The variance hinge is averaged over both branches; the covariance term is the sum of both
    branches' squared off-diagonal covariances divided by the dimension (not halved).
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 eps: float = 1e-4, gamma: float = 1.0):
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff
        self.eps, self.gamma = eps, gamma

    def terms(self, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
        if z1.shape != z2.shape or z1.dim() != 2:
            raise UserError(f"VICRegLoss: expected two (N, D) embeddings of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        invariance = F.mse_loss(z1, z2)
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        if z1.shape[0] < 2:
            raise UserError(f"VICRegLoss: needs at least 2 embeddings across all ranks, got {z1.shape[0]}")
        n, d = z1.shape
        z1, z2 = z1 - z1.mean(0), z2 - z2.mean(0)
        std1, std2 = (torch.sqrt(z.var(0) + self.eps) for z in (z1, z2))
        variance = F.relu(self.gamma - std1).mean() / 2 + F.relu(self.gamma - std2).mean() / 2
        cov1, cov2 = (z.T @ z / (n - 1) for z in (z1, z2))
        covariance = off_diagonal(cov1).pow(2).sum() / d + off_diagonal(cov2).pow(2).sum() / d
        return {"invariance": invariance, "variance": variance, "covariance": covariance}

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        """The weighted sum of the three terms returned by :meth:`terms`."""
        return self.sim_coeff * terms["invariance"] + self.std_coeff * terms["variance"] + self.cov_coeff * terms["covariance"]

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return self.combine(self.terms(z1, z2))


class Expander(nn.Module):
    """VICReg's expander: (Linear, BatchNorm, ReLU) x (n - 1), then a final Linear without bias.

    Example:
        >>> Expander(192, (512, 512, 512))(torch.randn(4, 192)).shape
        torch.Size([4, 512])
    """

    def __init__(self, in_dim: int, sizes: tuple[int, ...] = (2048, 2048, 2048)):
        super().__init__()
        if not sizes or min(sizes) < 1:
            raise UserError(f"Expander: sizes must be a non-empty tuple of positive ints, got {sizes}")
        dims = (in_dim, *sizes)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-2], dims[1:-1]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
