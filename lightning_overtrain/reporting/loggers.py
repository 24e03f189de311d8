"""Every snapshot's numbers through ``trainer.loggers``, each row carrying the tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_overtrain import keys
from lightning_overtrain.history import scalars
from lightning_overtrain.reporting.base import Reporter, RunView

if TYPE_CHECKING:
    import lightning.pytorch as pl


class LoggerReporter(Reporter):
    """Logs each record to every Lightning logger under ``<prefix>/...``.

    Every row includes ``<prefix>/tokens`` (so any logger can plot against tokens)
    and is logged at the trainer's global step.
    """

    def report(self, trainer: pl.Trainer, view: RunView, record: dict[str, float]) -> None:
        metrics = keys.prefixed(view.prefix, scalars(record))  # loggers take numbers only
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
