"""``LoopMonitor``: the monitor in a plain PyTorch training loop, one call per optimizer step.

The loop trains as it likes; after each optimizer step it calls
:meth:`LoopMonitor.step` with the model and the step's batch (or its token
count), and reads :attr:`LoopMonitor.should_stop`. The monitor's state goes into
the loop's own checkpoints through :meth:`state_dict` / :meth:`load_state_dict`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from lightning_overtrain.core.fit_setup import default_reporters
from lightning_overtrain.core.host import Host, RunHandle
from lightning_overtrain.core.monitor_core import MonitorCore
from lightning_overtrain.engine.collectives import Collectives
from lightning_overtrain.frontends.common import show_core, unwrap
from lightning_overtrain.history import Record
from lightning_overtrain.reporting.base import RunView


@show_core
class LoopMonitor:
    """Watch a plain PyTorch loop for catastrophic overtraining.

    Takes the arguments of :class:`~lightning_overtrain.OvertrainingMonitor`
    (``reference_data``, a cadence, ``probes``, ``policy``, ...); ``dirpath``
    defaults to ``./<prefix>``. Under ``torch.distributed`` every rank makes the
    same calls (the ranks and sums come from the default process group unless
    :meth:`start` is given ``collectives``).

    Raises:
        ValueError: on bad arguments, naming the argument, the value and the fix.

    Example::

        monitor = LoopMonitor(held_out_batches, every_n_steps=2, dirpath=str(tmp / "mon"))
        monitor.start(model, optimizer=optimizer)  # before training: the initial weights
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(model=model, batch=batch, optimizer=optimizer)
            if monitor.should_stop:
                break
        monitor.finish()
    """

    def __init__(self, reference_data: Any, **settings: Any) -> None:
        self.core = MonitorCore(reference_data, **settings)
        self.global_step = 0
        self._handle: RunHandle | None = None
        self._resumed = False

    @property
    def state_key(self) -> str:
        return self.core.state_key

    @property
    def started(self) -> bool:
        return self._handle is not None

    @property
    def should_stop(self) -> bool:
        """Whether the ranks agreed the policy says stop; the loop should end now."""
        return self.core.stop_requested

    def config(self) -> dict[str, Any]:
        return self.core.config()

    def view(self) -> RunView:
        return self.core.view()

    def start(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        collectives: Collectives | None = None,
        forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
        loggers: Sequence[Any] = (),
        extras: dict[str, Any] | None = None,
        gradient_clip_val: float | None = None,
        default_dirpath: str | None = None,
        lr_scheduler: Any = None,
        late: bool = False,
    ) -> None:
        """Take the reference set, measure the init std and check everything, before training.

        Call it before the first optimizer step: the noise is scaled by the std of the
        weights as they are now. A loop that does not call it is started by its first
        :meth:`step`, after training began, so the std comes from ``init_std`` or the
        model's transformers config (``initializer_range``), else a clear error.

        Args:
            model: the model being trained (a DDP or Fabric wrapper is unwrapped).
            optimizer: the training optimizer(s), read only (the cooldown and the
                sharpness probe read them).
            collectives: rank, world size, sum and agreement; default: the
                ``torch.distributed`` default group, or one process.
            forward_context: the precision context of the training forward pass,
                e.g. ``lambda: torch.autocast("cuda", dtype=torch.bfloat16)``.
            loggers: objects with ``log_metrics(metrics, step)`` (Lightning and Fabric
                loggers have it); each snapshot's numbers go to them.
            extras: more for the probes' context (e.g. ``{"grad_scaler": factory}``).
            lr_scheduler: the training lr scheduler, read only (the schedule probe steps
                a copy of it to tell warm-up, stable and decay apart).
            gradient_clip_val: the cooldown branch clips gradients by norm like this.
            default_dirpath: where history files go when ``dirpath`` was not given.
            late: training has begun already (the weights are not the initial ones).

        Raises:
            ValueError: when the reference data, the loss or a probe does not work.
        """
        module = unwrap(model)
        optimizers = _as_list(optimizer)
        device = next(module.parameters()).device
        collectives = collectives or Collectives.from_torch(device)
        core = self.core
        core.set_default_dirpath(default_dirpath or os.path.join(os.getcwd(), core.prefix))
        core.use_reporters(default_reporters())
        self._handle = RunHandle(self.global_step, list(loggers), collectives.is_global_zero)
        host = Host(
            module=module,
            collectives=collectives,
            forward_context=forward_context or nullcontext,
            optimizers=lambda: optimizers,
            extras={
                **(extras or {}),
                **({"lr_scheduler": lr_scheduler} if lr_scheduler is not None else {}),
            },
            handle=self._handle,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm="norm" if gradient_clip_val is not None else None,
        )
        resumed = "the loaded state" if self._resumed else None
        if late and not resumed:
            resumed = "none: the first step() came before start(); call start() before training"
        core.start(host, step=self.global_step, resumed_from=resumed)

    def step(
        self,
        model: nn.Module | None = None,
        batch: Any = None,
        *,
        batches: Sequence[Any] | None = None,
        tokens: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> Record | None:
        """One optimizer step finished: count its tokens; take a snapshot if one is due.

        Args:
            model: the model (needed on the first call, which starts the monitor).
            batch: the step's batch on this rank ...
            batches: ... or its micro-batches, under gradient accumulation ...
            tokens: ... or this rank's token count for the step.
            optimizer: the training optimizer (first call only).

        Returns:
            The snapshot's record when one was taken, else None.

        Raises:
            ValueError: when none or several of ``batch``, ``batches``, ``tokens`` are given.
        """
        chosen = (("batch", batch), ("batches", batches), ("tokens", tokens))
        given = [name for name, value in chosen if value is not None]
        if len(given) != 1:
            raise ValueError(
                f"Pass exactly one of `batch`, `batches` or `tokens` to step(), got"
                f" {given or 'none'}. E.g. monitor.step(model=model, batch=batch)."
            )
        if not self.started:
            if model is None:
                raise ValueError("The first step() needs `model=`, the model being trained.")
            self.start(model, optimizer=optimizer, late=True)
        if tokens is not None:
            self.core.count_tokens(tokens)
        for one in batches if batches is not None else [batch]:
            self.core.count(one)
        self.global_step += 1
        if self.core.end_step(self.global_step):
            return self.snapshot()
        return None

    def snapshot(self) -> Record:
        """Probe the live model now (on every rank); the record is also in :attr:`history`."""
        assert self._handle is not None, "start() or step() comes first"
        self._handle.global_step = self.global_step
        return self.core.snapshot(self.global_step)

    def finish(self) -> None:
        """Training ended: the last exact count and the reporters' closing (every rank)."""
        if self._handle is not None:
            self._handle.global_step = self.global_step
            self.core.end()

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state for the loop's checkpoint (call it on every rank)."""
        return {**self.core.state_dict(), "loop_step": self.global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (before :meth:`start` and the first :meth:`step`).

        Raises:
            RuntimeError: after :meth:`start`, which already chose the run's directory and
                measured the noise scale for a new run.
        """
        if self.started:
            raise RuntimeError(
                "load_state_dict() came after start(): the monitor already set up a new run"
                " (its directory, the noise scale). Call monitor.load_state_dict(state) before"
                " monitor.start(...) (or before the first step())."
            )
        self.core.load_state_dict(state_dict)
        self.global_step = int(state_dict.get("loop_step", self.global_step))
        self.core.last_step = self.global_step
        self._resumed = True


def _as_list(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The optimizers, out of Fabric's wrapper (``_FabricOptimizer.optimizer``)."""
    if optimizer is None:
        return []
    many = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    return [getattr(o, "optimizer", o) for o in many]
