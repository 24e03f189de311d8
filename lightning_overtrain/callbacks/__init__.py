"""Lightning callbacks."""

from lightning_overtrain.callbacks.monitor import OvertrainingMonitor

__all__ = ["OvertrainingMonitor"]
