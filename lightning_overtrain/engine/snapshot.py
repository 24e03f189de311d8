"""One snapshot's measurements: the reference loss, then every probe, on a borrowed model.

This is the engine shared by the live monitor and anything that probes a model
outside a training loop (a checkpoint series, a benchmark): it needs a
:class:`ProbeContext`, not a Trainer. It keeps the contract every probe relies
on (:class:`~lightning_overtrain.engine.contract.Probe`): each probe starts from
the live weights, and a failure on any rank is agreed by all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack

import torch

from lightning_overtrain import keys
from lightning_overtrain.engine.agreement import Agreement
from lightning_overtrain.engine.backup import borrowed
from lightning_overtrain.engine.contract import Probe, ProbeContext, ProbeFailure
from lightning_overtrain.engine.divergence import TrainingDiverged
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
        probes: run in order, each from the unperturbed model (the engine puts the
            weights back after each one, whatever it did).
        on_failure: called with ``(what, exception)`` for a probe that failed (on every
            rank alike); it may re-raise to stop, or return to skip that probe.
        cooldown: a branch to measure instead of the live weights (see
            :mod:`lightning_overtrain.probes.cooldown`): entered first, it moves ``ctx.module``
            to the cooled weights and yields its own metrics; on exit the live weights
            come back. The raw reference loss is recorded first.

    Returns:
        ``{"reference_loss": ..., <probe metrics>...}``; a failed probe adds only
        what it measured before failing (:attr:`ProbeFailure.partial`), and only when
        it failed on every rank alike (so every rank records the same).
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
                    record.update(run_probe(probe, ctx))
                except Exception as exc:
                    if isinstance(exc, ProbeFailure):
                        record.update(exc.partial)
                    on_failure(probe.name, exc)
    return record


def run_probe(probe: Probe, ctx: ProbeContext) -> dict[str, float]:
    """Run one probe on the borrowed ``ctx.module`` under the engine's contract.

    Afterwards, whatever the probe did, the module is as :func:`borrowed` lent it:
    the saved weights and buffers, eval mode, grad mode off, ``.grad`` None. Under
    several ranks the probe's collectives are guarded (:class:`Agreement`), so a
    probe that raises on some ranks only fails on all of them, without a hang.

    Raises:
        Exception: the probe's own error, where it failed alike on every rank (or in
            one process); else, where any rank failed, :class:`ProbeFailure` without
            partial results on every rank (they may differ between ranks).
    """
    if ctx.world_size <= 1:
        try:
            return probe.run(ctx)
        finally:
            _hand_back(ctx)
    agreement = Agreement(ctx.reduce_sum, ctx.world_size, ctx.device)
    error: Exception | None = None
    ctx.reduce_sum = agreement.reduce_sum
    try:
        result = probe.run(ctx)
    except Exception as exc:  # agreed below with the other ranks
        error = exc
    finally:
        ctx.reduce_sum = agreement.inner
        _hand_back(ctx)
    failed, cut = agreement.finish(error is not None, error)
    if error is not None and failed == ctx.world_size and not cut:
        raise error  # the probe's own failure, alike on every rank: its partial results too
    if failed:
        message = _failure_message(error, agreement.cut, failed, cut, ctx.world_size)
        raise ProbeFailure(message + agreement.other_errors()) from error
    return result


def _failure_message(
    error: Exception | None, cut_here: bool, failed: int, cut: int, world_size: int
) -> str:
    if cut_here:  # the engine's own ProbeFailure says why
        return f"the probe was stopped on this rank: {error}"
    own = failed - cut  # ranks whose probe raised by itself
    if error is not None:
        return f"the probe failed on {own} of {world_size} rank(s): {type(error).__name__}: {error}"
    if own:
        return f"the probe failed on {own} of {world_size} rank(s), not on this one"
    return f"the probe was stopped on {cut} other rank(s): the ranks made different collectives"


def _hand_back(ctx: ProbeContext) -> None:
    """Put the module back as it was lent, for the next probe."""
    ctx.backup.restore()
    ctx.module.train(False)
    torch.set_grad_enabled(False)
    for param in ctx.backup.params:
        param.grad = None


def _reference_loss(ctx: ProbeContext) -> float:
    sums = ctx.reduce_or_fail(ctx.local_loss_sums, (2,))
    loss = float(sums[0] / sums[1])
    if not math.isfinite(loss):
        raise TrainingDiverged(loss)
    return loss
