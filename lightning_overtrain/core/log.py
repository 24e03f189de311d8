"""The core's messages: on rank zero only, through Lightning's logger and Python warnings.

Rank zero is the front end's (its :class:`~lightning_overtrain.engine.collectives.Collectives`),
so the messages are right under any framework, not only where Lightning set the rank.
"""

from __future__ import annotations

import warnings

from lightning.fabric.utilities.rank_zero import rank_zero_module

from lightning_overtrain.engine.collectives import Collectives


def info(collectives: Collectives, message: str) -> None:
    """Log ``message`` at INFO on rank zero (the logger Lightning's own messages use)."""
    if collectives.is_global_zero:
        rank_zero_module.log.info(message)


def warn(collectives: Collectives, message: str) -> None:
    """Warn with ``message`` (a ``UserWarning``) on rank zero."""
    if collectives.is_global_zero:
        warnings.warn(message, UserWarning, stacklevel=3)
