"""What every probe gets from the monitor, and how a probe fails without a deadlock.

A probe is a small object with a ``name``, a ``validate`` called before training
and a ``run(ctx)`` that returns flat ``{metric: float}``. The maths lives in plain
functions beside each probe; the :class:`ProbeContext` carries the borrowed model
and the distributed plumbing, so the same probe code serves one process and DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_overtrain import keys
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.losses import LossFn, loss_sums
from lightning_overtrain.keys import Signal


class ProbeFailure(RuntimeError):
    """A probe could not produce finite numbers at this snapshot (on any rank).

    Args:
        message: what failed, and where.
        partial: the metrics the probe did measure before failing (e.g. the other
            learning rates of a fine-tune); the monitor records them and still
            counts the failure.
    """

    def __init__(self, message: str, partial: Mapping[str, float] | None = None) -> None:
        super().__init__(message)
        self.partial: dict[str, float] = dict(partial or {})


@dataclass
class ProbeContext:
    """The borrowed model and everything a probe needs to measure it.

    Attributes:
        module: the live model (in eval mode under ``no_grad`` unless a probe asks).
        backup: the saved weights; ``backup.restore()`` undoes any perturbation (the
            engine also does, after each probe).
        sigmas: ``sigma_t`` per parameter, aligned with ``backup.params``.
        batches: this rank's shard of the reference set, on the module's device.
        weights: tokens per batch in ``batches``.
        loss_fn: ``loss_fn(module, batch) -> scalar mean loss``.
        reference_loss: ``L(theta_T)`` over the whole reference set (all ranks).
        reduce_sum: adds a tensor across ranks in place (identity in one process);
            while a probe runs under several ranks, guarded by the engine.
        forward_context: the training framework's precision context.
        world_size: number of ranks.
        rank: this rank (from the front end's collectives, like ``reduce_sum``).
    """

    module: nn.Module
    backup: ModelBackup
    sigmas: Sequence[float]
    batches: Sequence[Any]
    weights: Sequence[int]
    loss_fn: LossFn
    reference_loss: float = float("nan")
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext
    world_size: int = 1
    extras: dict[str, Any] = field(default_factory=dict)
    rank: int = 0

    @property
    def device(self) -> torch.device:
        return self.backup.params[0].device if self.backup.params else torch.device("cpu")

    def local_loss_sums(self) -> torch.Tensor:
        """``[sum loss * tokens, sum tokens]`` of the reference shard at the current weights."""
        return loss_sums(
            self.module, self.batches, self.weights, self.loss_fn, self.forward_context
        )

    def reduce_or_fail(
        self, compute: Callable[[], torch.Tensor], shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Run a rank-local computation, then add its result across ranks, safely.

        Every rank reaches the one collective call even when its own computation
        raised (it sends zeros and a failure flag), so a fault on one rank never
        leaves the others waiting. If any rank failed, every rank raises
        :class:`ProbeFailure`, and the monitor skips the probe on all of them alike.
        The weights are left as ``compute`` left them (the engine restores them
        after the probe; call ``backup.restore()`` to start over within it).

        Args:
            compute: returns a float64 tensor of ``shape`` on :attr:`device`.
            shape: the shape ``compute`` returns (known even when it fails).
        """
        error: BaseException | None = None
        try:
            local = compute().to(torch.float64).reshape(shape)
        except Exception as exc:  # any probe fault is reported, never a hang
            error = exc
            local = torch.zeros(shape, dtype=torch.float64, device=self.device)
        flag = torch.tensor(
            [0.0 if error is None else 1.0], dtype=torch.float64, device=self.device
        )
        packed = self.reduce_sum(torch.cat([local.flatten(), flag]))
        failed_ranks = int(packed[-1].item())
        if failed_ranks:
            where = (
                f" on {failed_ranks} of {self.world_size} rank(s)" if self.world_size > 1 else ""
            )
            detail = f": {type(error).__name__}: {error}" if error is not None else ""
            if self.world_size > 1:  # every rank saw the flag: all of them gather the texts
                from lightning_overtrain.engine.agreement import (
                    describe_other_errors,
                    gather_errors,
                )

                detail += describe_other_errors(gather_errors(error, False))
            raise ProbeFailure(f"the computation failed{where}{detail}") from error
        return packed[:-1].reshape(shape)


class Probe:
    """Base class of the monitor's probes.

    Subclasses set :attr:`name` and implement :meth:`run`; :meth:`validate` may
    check the model and data before training starts, and :meth:`signals` declares
    which of the keys :meth:`run` returns are curves to watch, draw and tabulate.

    What every probe can rely on (the engine keeps it, built-in or user-written):

    - :meth:`run` starts from the live weights and buffers, in eval mode, under
      ``no_grad``, with every ``.grad`` None; afterwards the engine puts all of
      that back, whatever the probe did (perturbing in place without restoring,
      raising halfway), so the next probe and training never see it.
    - A probe that raises on some ranks only is agreed on by the engine: the
      other ranks' next collective through the context raises
      :class:`ProbeFailure`, every rank skips the probe, and none waits forever.
      The rule that makes this work: **make collectives only through the
      context** (``ctx.reduce_sum``, ``ctx.reduce_or_fail``, or functions given
      ``reduce_sum=ctx.reduce_sum``), never ``torch.distributed`` directly, and
      the same ones on every rank.
    - A failure is logged, counted and skipped (unless ``on_probe_error="raise"``);
      a :class:`ProbeFailure` raised alike on every rank keeps its ``partial``.
    - While the probe holds the model, ``module.state_dict()`` (so any checkpoint
      written meanwhile) shows the live weights, not the probe's.

    Example::

        class ShrunkLoss(Probe):
            name = "shrunk"  # the reference loss with every weight scaled by 0.9

            def run(self, ctx):
                def local():
                    for p in ctx.backup.params:
                        p.mul_(0.9)  # no need to undo: the engine restores the weights
                    return ctx.local_loss_sums()

                loss_sum, tokens = ctx.reduce_or_fail(local, (2,)).tolist()
                return {"shrunk/reference_loss": loss_sum / tokens}
    """

    name: str = "probe"

    def validate(self, ctx: ProbeContext) -> None:
        """Raise a clear error before training if this probe cannot run on ``ctx``."""

    def run(self, ctx: ProbeContext) -> dict[str, float]:
        """Measure the borrowed model; return flat ``{metric key: value}``."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The probe's settings, for the run's config and ``monitor.json``."""
        return {}

    def signals(self) -> list[Signal]:
        """The curves this probe measures, as :class:`~lightning_overtrain.keys.Signal` objects.

        Called after :meth:`validate`. The default policy watches every ``u_shaped``
        signal for an inflection (and may keep its bottom as the best snapshot); the
        figures draw them, the summary table shows them and W&B plots them against
        tokens. Keys :meth:`run` returns without a declaration are still recorded and
        logged. Default: none.

        Example::

            def signals(self):
                return [Signal("mine/loss", u_shaped=True, label="my loss")]
        """
        return []


def declared_signals(probes: Sequence[Probe]) -> list[Signal]:
    """The reference loss and every probe's :meth:`Probe.signals`, each key once.

    Raises:
        ValueError: when a probe's ``signals()`` returns something other than Signals.
    """
    out = {keys.REFERENCE_LOSS: keys.reference_signal()}
    for probe in probes:
        declared = list(probe.signals())
        if not all(isinstance(s, Signal) for s in declared):
            raise ValueError(
                f"`{type(probe).__name__}.signals()` must return Signal objects, got"
                f" {declared!r}. Return e.g. [Signal('{probe.name}/loss', u_shaped=True)]."
            )
        out.update({s.key: s for s in declared if s.key not in out})
    return list(out.values())
