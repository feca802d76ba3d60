"""Which device a run uses, mixed precision on it, and joining a ``torchrun`` process group."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from ..errors import UserError

__all__ = ["resolve_device", "init_distributed", "is_distributed", "autocast_for"]


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA, then MPS, then CPU; any other torch device string is checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use auto or cpu")
    if device.type == "mps" and not _mps_available():
        raise UserError(f"device {name!r} requested but MPS is not available; use auto or cpu")
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on CUDA, else gloo).

    Returns True when running distributed. Safe to call when not launched by torchrun.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere (bf16 matmuls are far slower than fp32 on CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
