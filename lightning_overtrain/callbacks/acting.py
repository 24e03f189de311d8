"""Acting on the policy's decisions: warn and alert on rank zero, stop only if all ranks agree."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_overtrain.inflection.policy import Decision

#: ``alert(title, text, level)``: the reporters' alert, called on rank zero only.
Alert = Callable[[str, str, str], None]


def act(trainer: pl.Trainer, decisions: Sequence[Decision], alert: Alert) -> str | None:
    """Warn and alert for each decision; stop the run if any rank's policy says stop.

    Called at every snapshot on every rank, so its one collective always pairs up
    (``reduce_boolean_decision``, Lightning's way for all ranks to agree).

    Returns:
        The stop reason when training stops (``trainer.should_stop`` is set), else None.
    """
    for decision in decisions:
        rank_zero_warn(f"OvertrainingMonitor ({decision.action}): {decision.message}")
        if trainer.is_global_zero:
            title = f"Overtraining {decision.trigger}: {decision.signal}"
            alert(title, decision.message, decision.action)
    stops = [d for d in decisions if d.action == "stop"]
    if not trainer.strategy.reduce_boolean_decision(bool(stops), all=False):
        return None
    reason = " ".join(d.message for d in stops) or "Another rank's policy decided to stop."
    trainer.should_stop = True
    rank_zero_info(f"OvertrainingMonitor stopped training: {reason}")
    return reason
