"""A reference loss that is not finite: the run diverged, which no probe can measure.

Probes are judged against ``L(theta)``; when it is NaN or inf the weights
themselves have blown up, so the snapshot says "training diverged" (a warning,
or a stop when the policy stops), not "a probe failed".
"""

from __future__ import annotations

from lightning_overtrain.engine.contract import ProbeFailure


class TrainingDiverged(ProbeFailure):
    """The reference loss of the live weights is not finite (the same on every rank).

    Args:
        loss: the reference loss measured (NaN or inf).
    """

    def __init__(self, loss: float) -> None:
        super().__init__(f"the reference loss is {loss}")
        self.loss = loss


def diverged_message(loss: float, tokens: int, step: int) -> str:
    """What the monitor says when the reference loss is not finite."""
    return (
        f"training diverged: the reference loss of the live weights is {loss} at"
        f" {tokens:,} tokens (step {step}), so no probe can be measured. Check the learning"
        " rate, the precision and the data (lower the lr, raise the warm-up, clip gradients)."
    )
