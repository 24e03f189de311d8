"""Reporters: where the monitor's records go. Replaceable; the core imports no wandb."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_overtrain.callbacks.monitor import OvertrainingMonitor


class Reporter:
    """Receives the monitor's events on rank zero only.

    Reporters never make collective calls: the monitor calls them from rank zero
    after every rank has agreed on the numbers.
    """

    def setup(self, trainer: pl.Trainer, monitor: OvertrainingMonitor) -> None:
        """Called once before training, after the monitor has checked its inputs."""

    def report(
        self, trainer: pl.Trainer, monitor: OvertrainingMonitor, record: dict[str, float]
    ) -> None:
        """Called after every snapshot with the new record (relative keys)."""

    def alert(
        self, trainer: pl.Trainer, monitor: OvertrainingMonitor, title: str, text: str, level: str
    ) -> None:
        """Called when the monitor warns or stops (``level`` is ``"warn"`` or ``"stop"``)."""

    def teardown(self, trainer: pl.Trainer, monitor: OvertrainingMonitor) -> None:
        """Called once when training ends."""

    def config(self) -> dict[str, Any]:
        return {}
