"""What a front end hands the core: the model, the ranks' channel, precision, optimizers, saving.

The core knows no training framework. A front end (the Lightning callback, Fabric,
the Hugging Face ``Trainer``, a plain loop) fills one :class:`Host` when training
starts and the core reads everything framework-specific from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.collectives import Collectives


class SaveBest(Protocol):
    """Writes the kept snapshot ``(path, backup, cooled, state_key, state)``; on every rank.

    Returns None once ``path`` holds it, else the error (the same on every rank).
    """

    def __call__(
        self, path: str, backup: ModelBackup, cooled: bool, state_key: str, state: dict[str, Any]
    ) -> Exception | None: ...


@dataclass
class RunHandle:
    """What reporters receive as ``trainer`` outside the Lightning ``Trainer``.

    The few attributes the built-in reporters read: the step, the loggers
    (objects with ``log_metrics(metrics, step)``), rank zero, and no progress bar.
    """

    global_step: int = 0
    loggers: list[Any] = field(default_factory=list)
    is_global_zero: bool = True
    progress_bar_callback: Any = None


@dataclass
class Host:
    """The training framework, as the core sees it.

    Attributes:
        module: the model the probes borrow (the unwrapped module, never a DDP wrapper).
        collectives: rank, world size, the sum and the agreement (one channel).
        forward_context: the framework's precision context for forward passes.
        optimizers: returns the training optimizers (read only: the cooldown copies
            the first one's state and lr, the sharpness probe reads its direction).
        extras: more for the probes' context (e.g. a ``grad_scaler`` factory under 16-mixed).
        save_best: writes the kept snapshot; None:
            :func:`~lightning_overtrain.core.keeping.save_weights`.
        handle: what reporters get as their first argument (the Lightning ``Trainer``,
            or a :class:`RunHandle`).
        gradient_clip_val: the cooldown branch clips as training does (None: no clipping).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        device: where counts and flags are summed; default: the module's first parameter's.
    """

    module: nn.Module
    collectives: Collectives = field(default_factory=Collectives)
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext
    optimizers: Callable[[], Sequence[torch.optim.Optimizer]] = tuple
    extras: dict[str, Any] = field(default_factory=dict)
    save_best: SaveBest | None = None
    handle: Any = field(default_factory=RunHandle)
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    device: torch.device | None = None

    def __post_init__(self) -> None:
        if self.device is None:  # where the weights are: the device the counts sum on
            param = next(self.module.parameters(), None)
            self.device = param.device if param is not None else torch.device("cpu")
