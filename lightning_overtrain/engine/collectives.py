"""The one collective the monitor uses, a sum across ranks, and where this rank stands."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 in one process)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` across ranks in place (no-op in one process) and return it.

    One ``all_reduce``, no barrier: every rank calls it at the same points of the
    same code, which is what keeps the monitor deadlock-free.
    """
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
