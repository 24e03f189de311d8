"""The training learning rate at a snapshot, and the phase of its schedule.

Learning-rate decay itself sharpens a model and worsens forgetting after
fine-tuning (Yano et al., arXiv 2603.16127; Rofin et al., arXiv 2604.13627), so a
probe curve that jumps where the schedule starts to decay is not overtraining.
Every snapshot therefore says at which lr, and in which phase, it was taken:

* ``warmup``: the lr is rising;
* ``stable``: the lr is constant at the highest value seen so far;
* ``decay``: the lr is falling, or constant below an earlier, higher value (a
  step schedule between two drops, or the floor after an anneal).

The phase is read from the lrs around the snapshot: the next lrs the training
scheduler will set (:func:`future_lrs`, which steps a copy of the scheduler on a
stand-in optimizer, never the real one) and, where the scheduler cannot say
(none, or one that waits for a metric such as ``ReduceLROnPlateau``), the lrs
seen at earlier snapshots.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

#: The phases, in the order of their codes in a record (``schedule/phase``).
PHASES = ("warmup", "stable", "decay")

# Two lrs closer than this (relative) are the same lr: float noise of a closed form.
_REL_TOL = 1e-9


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr the optimizer's next step uses (its first param group's)."""
    return float(optimizer.param_groups[0]["lr"])


def future_lrs(scheduler: Any, optimizer: torch.optim.Optimizer, steps: int = 1) -> list[float]:
    """The lrs ``scheduler`` will set over its next ``steps`` steps, without touching either.

    A deep copy of the scheduler is stepped on a stand-in optimizer (one tiny
    parameter per group, the same hyperparameters): the training optimizer, its
    state and the scheduler itself stay as they were, even for schedulers that
    hold others (``SequentialLR``, ``ChainedScheduler``).

    Args:
        scheduler: a ``torch.optim.lr_scheduler.LRScheduler`` driving ``optimizer``.
        optimizer: the training optimizer (only read).
        steps: how many future lrs; >= 1.

    Returns:
        The first group's lr after each of the next ``steps`` scheduler steps; empty
        for a scheduler that cannot be stepped without a metric (``ReduceLROnPlateau``)
        or that fails to copy or step.

    Example::

        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> future_lrs(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), opt, 2)
        [0.5, 0.25]
    """
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return []
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    stand_in.param_groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [torch.zeros(1)]}
        for group in optimizer.param_groups
    ]
    # The memo maps the real optimizer to the stand-in everywhere in the copy.
    try:
        clone = copy.deepcopy(scheduler, memo={id(optimizer): stand_in})
        out = []
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore")
            for _ in range(steps):
                clone.step()
                out.append(float(stand_in.param_groups[0]["lr"]))
    except Exception:  # a scheduler we cannot simulate: fall back to the lrs seen
        return []
    return out


def schedule_phase(
    current: float, seen: Sequence[float] = (), upcoming: Sequence[float] = ()
) -> str:
    """The phase of the schedule at lr ``current``: ``"warmup"``, ``"stable"`` or ``"decay"``.

    Args:
        current: the lr now.
        seen: lrs at earlier snapshots, oldest first (may be empty).
        upcoming: the next lrs the scheduler will set (may be empty, see :func:`future_lrs`).

    Returns:
        ``"warmup"`` if the lr rises at the scheduler's next step (without
        ``upcoming``: rose since the last snapshot); ``"decay"`` if it falls there (fell),
        or holds below an earlier higher lr; else ``"stable"``. Only the next step
        counts: a constant lr that will drop later is still ``"stable"``.

    Example::

        >>> schedule_phase(1e-3, seen=[1e-4, 5e-4], upcoming=[1e-3])
        'stable'
        >>> schedule_phase(5e-4, seen=[1e-3], upcoming=[5e-4])
        'decay'
    """
    # The scheduler's next lr; else (none, or one that waits for a metric) the last seen.
    last = seen[-1] if seen else current
    step = upcoming[0] - current if upcoming else current - last
    if not _same(current + step, current):
        return "warmup" if step > 0 else "decay"
    peak = max([*seen, current])
    return "decay" if current < peak and not _same(current, peak) else "stable"


def phase_code(phase: str) -> float:
    """The number a record holds for ``phase``: its index in :data:`PHASES`."""
    return float(PHASES.index(phase))


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=0.0)
