"""Acting on the policy's decisions: warn and alert on rank zero, stop only if all ranks agree."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lightning_overtrain.core.log import info, warn
from lightning_overtrain.engine.collectives import Collectives
from lightning_overtrain.inflection.policy import Decision

#: ``alert(title, text, level)``: the reporters' alert, called on rank zero only.
Alert = Callable[[str, str, str], None]


def act(collectives: Collectives, decisions: Sequence[Decision], alert: Alert) -> str | None:
    """Warn and alert for each decision; decide to stop if any rank's policy says stop.

    Called at every snapshot on every rank, so its one agreement
    (``collectives.any_rank``) always pairs up.

    Returns:
        The stop reason when training must stop (the front end stops it), else None.
    """
    for decision in decisions:
        warn(collectives, f"OvertrainingMonitor ({decision.action}): {decision.message}")
        if collectives.is_global_zero:
            title = f"Overtraining {decision.trigger}: {decision.signal}"
            alert(title, decision.message, decision.action)
    stops = [d for d in decisions if d.action == "stop"]
    if not collectives.any_rank(bool(stops)):
        return None
    reason = " ".join(d.message for d in stops) or "Another rank's policy decided to stop."
    info(collectives, f"OvertrainingMonitor stopped training: {reason}")
    return reason
