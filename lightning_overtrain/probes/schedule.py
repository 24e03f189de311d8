"""The training lr and the phase of its schedule at every snapshot, as a probe.

A decay-phase jump in sharpness or forgetting is the schedule's doing, not
overtraining (see :mod:`lightning_overtrain.engine.schedule`): the record says
which phase each snapshot was taken in, so figures and readers can tell.
"""

from __future__ import annotations

from typing import Any

from lightning_overtrain.engine.contract import Probe, ProbeContext, ProbeFailure
from lightning_overtrain.engine.schedule import (
    PHASES,
    current_lr,
    future_lrs,
    phase_code,
    schedule_phase,
)
from lightning_overtrain.keys import Signal

LR = "schedule/lr"
PHASE = "schedule/phase"


class ScheduleProbe(Probe):
    """Log the training lr and its schedule phase (warm-up, stable, decay) at each snapshot.

    Reads the training optimizer and lr scheduler the monitor passes, read-only, in
    ``ctx.extras["optimizer"]`` and ``ctx.extras["lr_scheduler"]``; never touches the
    model. Logged:

    * ``schedule/lr``: the lr of the optimizer's first param group;
    * ``schedule/phase``: ``0`` warm-up, ``1`` stable, ``2`` decay
      (:data:`~lightning_overtrain.engine.schedule.PHASES`).

    The phase comes from the scheduler's next lr (a copy of it is stepped on a stand-in
    optimizer); without a scheduler, or with one that waits for a metric, from the lr
    at the previous snapshot this probe saw (the first snapshot after a resume then
    reads as ``stable`` or ``decay`` from the lr alone).

    Raises:
        ValueError: before training, when the monitor passes no training optimizer.

    Example::

        monitor = OvertrainingMonitor(val_batches, probes=[NoiseProbe(), ScheduleProbe()])
    """

    name = "schedule"

    def __init__(self) -> None:
        self._seen: list[float] = []

    def signals(self) -> list[Signal]:
        """The lr and the phase, one figure; neither is U-shaped or ranked."""
        title = "Training learning-rate schedule"
        return [
            Signal(LR, label="lr", unit="lr", figure="schedule", title=title,
                   panel="training lr", rank=None),
            Signal(PHASE, label="phase", unit=" / ".join(f"{i} {p}" for i, p in enumerate(PHASES)),
                   figure="schedule", title=title, panel="schedule phase", summary=False,
                   rank=None),
        ]  # fmt: skip

    def validate(self, ctx: ProbeContext) -> None:
        if ctx.extras.get("optimizer") is None:
            raise ValueError(
                "ScheduleProbe needs the training optimizer in ctx.extras['optimizer'] (the"
                " monitor passes trainer.optimizers[0]); leave it out of `probes` when"
                " training has no optimizer."
            )

    def run(self, ctx: ProbeContext) -> dict[str, float]:
        optimizer: Any = ctx.extras.get("optimizer")
        if optimizer is None:
            raise ProbeFailure("no training optimizer in ctx.extras['optimizer']")
        lr = current_lr(optimizer)
        scheduler = ctx.extras.get("lr_scheduler")
        upcoming = future_lrs(scheduler, optimizer) if scheduler is not None else []
        phase = schedule_phase(lr, self._seen, upcoming)
        self._seen.append(lr)
        return {LR: lr, PHASE: phase_code(phase)}
