"""The one channel for where this rank stands and what the ranks say to each other.

A front end (the Lightning callback, Fabric, the Hugging Face ``Trainer``, a plain
loop) builds one :class:`Collectives` from its own framework and hands it to the
core; everything below (token counts, probes, the stop and keep agreements) reads
the rank and makes its collectives through it, never through ``torch.distributed``
on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank in ``torch.distributed`` (0 when there is none)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` across ranks in place (no-op in one process) and return it.

    One ``all_reduce``, no barrier: every rank calls it at the same points of the
    same code, which is what keeps the monitor deadlock-free.
    """
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class Collectives:
    """This rank, the number of ranks, and the two collectives the monitor makes.

    Attributes:
        rank: this process's global rank.
        world_size: number of ranks that train together.
        reduce_sum: adds a tensor across ranks in place and returns it.
        any_rank: ``any_rank(flag)`` is True on every rank when ``flag`` is True on
            at least one (every rank must call it at the same point).

    Example::

        Collectives()  # one process
        Collectives.from_torch()  # whatever torch.distributed is set up with
    """

    rank: int = 0
    world_size: int = 1
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity
    any_rank: Callable[[bool], bool] = bool

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_torch(cls, device: torch.device | str = "cpu") -> Collectives:
        """The default ``torch.distributed`` group (one process when none is set up).

        Args:
            device: where the agreement's one-number tensor goes (the backend's device:
                CUDA for NCCL, CPU for gloo).
        """
        size = world_size()
        if size <= 1:
            return cls()

        def any_rank(flag: bool) -> bool:
            votes = torch.tensor([float(bool(flag))], device=device)
            return bool(all_reduce_sum(votes).item() > 0)

        return cls(rank(), size, all_reduce_sum, any_rank)
