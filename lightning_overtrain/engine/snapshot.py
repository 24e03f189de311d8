"""One snapshot's measurements: the reference loss, then every probe, on a borrowed model.

This is the engine shared by the live monitor and anything that probes a model
outside a training loop (a checkpoint series, a benchmark): it needs a
:class:`ProbeContext`, not a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack

import torch

from lightning_overtrain import keys
from lightning_overtrain.engine.backup import borrowed
from lightning_overtrain.engine.contract import Probe, ProbeContext, ProbeFailure
from lightning_overtrain.history import Record

OnFailure = Callable[[str, Exception], None]
Branch = Callable[[ProbeContext], AbstractContextManager[Record]]


def measure_snapshot(
    ctx: ProbeContext,
    probes: Sequence[Probe],
    on_failure: OnFailure,
    cooldown: Branch | None = None,
) -> Record:
    """Measure ``L(theta)`` and run ``probes`` on ``ctx.module``; hand the module back exactly.

    Args:
        ctx: the model, its backup, the reference shard and the reduction to use.
        probes: run in order, each on the unperturbed model.
        on_failure: called with ``(what, exception)`` for a probe that failed (on every
            rank alike); it may re-raise to stop, or return to skip that probe.
        cooldown: a branch to measure instead of the live weights (see
            :mod:`lightning_overtrain.probes.cooldown`): entered first, it moves ``ctx.module``
            to the cooled weights and yields its own metrics; on exit the live weights
            come back. The raw reference loss is recorded first.

    Returns:
        ``{"reference_loss": ..., <probe metrics>...}``; a failed probe adds only
        what it measured before failing (:attr:`ProbeFailure.partial`).
    """
    record: Record = {}
    with ExitStack() as stack:
        if cooldown is not None:
            try:
                with borrowed(ctx.module, ctx.backup), torch.no_grad():
                    record[keys.COOLDOWN_RAW_REFERENCE_LOSS] = _reference_loss(ctx)
                record.update(stack.enter_context(cooldown(ctx)))
            except Exception as exc:  # no cooled branch: probing the raw one would mix curves
                on_failure("cooldown", exc)
                return record
        with borrowed(ctx.module, ctx.backup), torch.no_grad():
            try:
                ctx.reference_loss = _reference_loss(ctx)
            except ProbeFailure as exc:
                on_failure("reference loss", exc)
                return record
            record[keys.REFERENCE_LOSS] = ctx.reference_loss
            for probe in probes:
                try:
                    record.update(probe.run(ctx))
                except Exception as exc:
                    if isinstance(exc, ProbeFailure):
                        record.update(exc.partial)
                    on_failure(probe.name, exc)
    return record


def _reference_loss(ctx: ProbeContext) -> float:
    sums = ctx.reduce_or_fail(ctx.local_loss_sums, (2,))
    loss = float(sums[0] / sums[1])
    if not math.isfinite(loss):
        raise ProbeFailure(f"the reference loss is {loss}")
    return loss
