"""``FabricMonitor``: the monitor in a Lightning Fabric loop (litgpt's ``pretrain`` and the like).

Register it as a Fabric callback and let the loop call its hooks by name, or call
them yourself (litgpt's loop calls none, so there it is one explicit call per
step)::

    fabric = Fabric(callbacks=[monitor])
    ...
    fabric.call("on_train_start", fabric=fabric, model=model, optimizer=optimizer)
    for batch in loader:
        ...  # forward, backward, optimizer step
        fabric.call("on_train_batch_end", fabric=fabric, model=model, batch=batch)
        if monitor.should_stop:
            break

Its state rides in the dict Fabric saves: ``fabric.save(path, {"model": model,
"optimizer": optimizer, "monitor": monitor})`` calls :meth:`state_dict` on every
rank, and ``fabric.load`` calls :meth:`load_state_dict`.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from lightning_overtrain.callbacks.strategies import (
    FABRIC_FSDP2,
    check_precision,
    check_strategy,
    precision_extras,
)
from lightning_overtrain.engine.collectives import Collectives, all_reduce_sum
from lightning_overtrain.frontends.loop import LoopMonitor
from lightning_overtrain.history import Record


def fabric_collectives(fabric: Any) -> Collectives:
    """The ranks as Fabric sees them; stop and keep decisions agreed through its strategy."""
    return Collectives(
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        reduce_sum=all_reduce_sum,
        any_rank=lambda flag: fabric.strategy.reduce_boolean_decision(flag, all=False),
    )


class FabricMonitor(LoopMonitor):
    """Watch a Lightning Fabric loop for catastrophic overtraining.

    Takes the arguments of :class:`~lightning_overtrain.OvertrainingMonitor`;
    ``dirpath`` defaults to ``<fabric.logger.log_dir>/<prefix>`` (``./<prefix>``
    without a logger). Each snapshot's numbers go to ``fabric.loggers``.

    Raises:
        ValueError: on bad arguments, naming the argument, the value and the fix.

    Example::

        monitor = FabricMonitor(held_out_batches, every_n_steps=2, dirpath=str(tmp / "fab"))
        fabric = Fabric(accelerator="cpu", devices=1, callbacks=[monitor])
        model, optimizer = fabric.setup(model, optimizer)
        fabric.call("on_train_start", fabric=fabric, model=model, optimizer=optimizer)
        for batch in batches:
            fabric.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
            fabric.call("on_train_batch_end", fabric=fabric, model=model, batch=batch)
            if monitor.should_stop:
                break
        fabric.call("on_train_end", fabric=fabric)
    """

    def on_train_start(
        self,
        fabric: Any,
        model: nn.Module,
        optimizer: Any = None,
        late: bool = False,
        lr_scheduler: Any = None,
    ) -> None:
        """Set up before the first optimizer step, where the initial weights are measured.

        Else the first :meth:`on_train_batch_end` starts it, with the init std from
        ``init_std`` or the model's config (see :meth:`LoopMonitor.start`). Pass the
        ``lr_scheduler`` (read only) for the schedule probe's phase.

        Raises:
            ValueError: before anything is measured, under a strategy or precision the
                monitor cannot measure (FSDP1, DeepSpeed, tensor parallelism, ...),
                naming it and what to use instead.
        """
        # The Lightning callback's rule: FSDP1's flattened parameters would read as
        # sigma 0 and delta 0, silently wrong numbers rather than an error.
        check_strategy(fabric.strategy, monitor=type(self).__name__, fsdp2=FABRIC_FSDP2)
        check_precision(fabric.strategy.precision, monitor=type(self).__name__)
        logger = fabric.loggers[0] if fabric.loggers else None
        log_dir = getattr(logger, "log_dir", None) if logger is not None else None
        self.start(
            model,
            optimizer=optimizer,
            collectives=fabric_collectives(fabric),
            forward_context=fabric.autocast,
            loggers=fabric.loggers,
            extras=precision_extras(fabric.strategy.precision),
            default_dirpath=os.path.join(log_dir, self.core.prefix) if log_dir else None,
            late=late,
            lr_scheduler=lr_scheduler,
        )

    def on_train_batch_end(
        self,
        fabric: Any,
        model: nn.Module,
        batch: Any = None,
        *,
        batches: Any = None,
        tokens: int | None = None,
        optimizer: Any = None,
    ) -> Record | None:
        """After each optimizer step: count the step's tokens; snapshot when one is due."""
        if not self.started:
            self.on_train_start(fabric, model, optimizer, late=True)
        return self.step(model, batch, batches=batches, tokens=tokens)

    def on_train_end(self, fabric: Any = None) -> None:
        """Training ended (every rank)."""
        self.finish()
