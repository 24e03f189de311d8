"""Every snapshot's numbers through ``trainer.loggers``, each row carrying the tokens; and
the third-party tips and banners a monitored run leaves out, each by name.

Quiet by default, and only what is named here:

- Lightning's litlogger tip (``"💡 Tip: ... litlogger ..."``, logged at INFO by every
  ``Trainer`` through Lightning's ``rank_zero`` loggers) is dropped by the logging filter
  :data:`LITLOGGER_TIP`, installed when the monitor is imported. Set the environment
  variable ``LIGHTNING_OVERTRAIN_TIPS=1`` (or remove the filter) to see it again.
- W&B's end-of-run "Run history / Run summary" block and its start banner: the runs this
  package starts itself (``lightning-overtrain watch --wandb-project``), and the example,
  pass :data:`WANDB_QUIET` as ``wandb.init``'s ``settings``. Your own ``WandbLogger``
  prints what you ask for: pass ``settings=WANDB_QUIET`` to it for the same.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from lightning_overtrain import keys
from lightning_overtrain.history import scalars
from lightning_overtrain.reporting.base import Reporter, RunView

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: ``wandb.init(settings=...)`` without the start banner and the end-of-run summary block.
WANDB_QUIET = {"quiet": True}
#: ... and without W&B's offline notice, for a script that says itself where the offline
#: run is (the main job): W&B's ``silent`` hides its own warnings too, so it is opt-in.
WANDB_SILENT = {"quiet": True, "silent": True}
#: Set to 1 to keep the third-party tips this module filters.
TIPS_ENV = "LIGHTNING_OVERTRAIN_TIPS"
# Lightning logs through whichever of its two rank_zero loggers was imported last.
_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class DropMessage(logging.Filter):
    """A logging filter, named ``name``, that drops the records whose message starts with
    ``start`` and contains ``word``; every other record passes."""

    def __init__(self, name: str, start: str, word: str) -> None:
        super().__init__(name)
        self.start, self.word = start, word

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.start) and self.word in message)


#: Drops Lightning's advertisement for litlogger; nothing else.
LITLOGGER_TIP = DropMessage("lightning-overtrain: litlogger tip", "💡 Tip:", "litlogger")


def quiet_third_party_tips() -> None:
    """Install :data:`LITLOGGER_TIP` on Lightning's loggers (once), unless ``TIPS_ENV=1``."""
    if os.environ.get(TIPS_ENV) == "1":
        return
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if LITLOGGER_TIP not in logger.filters:
            logger.addFilter(LITLOGGER_TIP)


quiet_third_party_tips()


class LoggerReporter(Reporter):
    """Logs each record to every Lightning logger under ``<prefix>/...``.

    Every row includes ``<prefix>/tokens`` (so any logger can plot against tokens)
    and is logged at the trainer's global step.
    """

    def report(self, trainer: pl.Trainer, view: RunView, record: dict[str, float]) -> None:
        metrics = keys.prefixed(view.prefix, scalars(record))  # loggers take numbers only
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
