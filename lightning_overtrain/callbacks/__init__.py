"""The Lightning ``Trainer``'s front end (``OvertrainingMonitor``), its cadence and checks.

``OvertrainingMonitor`` loads on first use, so the framework-neutral core can import
the cadence and the argument checks from here without importing ``lightning.pytorch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["OvertrainingMonitor"]

if TYPE_CHECKING:
    from lightning_overtrain.callbacks.monitor import OvertrainingMonitor


def __getattr__(name: str) -> Any:
    if name == "OvertrainingMonitor":
        from lightning_overtrain.callbacks.monitor import OvertrainingMonitor

        return OvertrainingMonitor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
