"""One snapshot's measurements: the reference loss, then every probe, on a borrowed model.

This is the engine shared by the live monitor and anything that probes a model
outside a training loop (a checkpoint series, a benchmark): it needs a
:class:`ProbeContext`, not a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lightning_overtrain import naming
from lightning_overtrain.borrow import borrowed
from lightning_overtrain.history import Record
from lightning_overtrain.probes.base import Probe, ProbeContext, ProbeFailure

OnFailure = Callable[[str, Exception], None]


def measure_snapshot(ctx: ProbeContext, probes: Sequence[Probe], on_failure: OnFailure) -> Record:
    """Measure ``L(theta)`` and run ``probes`` on ``ctx.module``; hand the module back exactly.

    Args:
        ctx: the model, its backup, the reference shard and the reduction to use.
        probes: run in order, each on the unperturbed model.
        on_failure: called with ``(what, exception)`` for a probe that failed (on every
            rank alike); it may re-raise to stop, or return to skip that probe.

    Returns:
        ``{"reference_loss": ..., <probe metrics>...}``; a failed probe adds nothing.
    """
    record: Record = {}
    with borrowed(ctx.module, ctx.backup), torch.no_grad():
        try:
            sums = ctx.reduce_or_fail(ctx.local_loss_sums, (2,))
            ctx.reference_loss = float(sums[0] / sums[1])
            if not math.isfinite(ctx.reference_loss):
                raise ProbeFailure(f"the reference loss is {ctx.reference_loss}")
        except ProbeFailure as exc:
            on_failure("reference loss", exc)
            return record
        record[naming.REFERENCE_LOSS] = ctx.reference_loss
        for probe in probes:
            try:
                record.update(probe.run(ctx))
            except Exception as exc:
                on_failure(probe.name, exc)
    return record
