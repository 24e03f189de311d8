"""Front ends over the monitor's core, one per way of training.

- :class:`~lightning_overtrain.OvertrainingMonitor` (``lightning_overtrain.callbacks.monitor``):
  the Lightning ``Trainer``'s callback.
- :class:`FabricMonitor`: a Lightning Fabric loop (``Fabric(callbacks=[monitor])``).
- :class:`HFTrainerMonitor`: the Hugging Face ``Trainer`` (a ``TrainerCallback``).
- :class:`LoopMonitor`: a plain PyTorch loop (``monitor.step(...)`` per optimizer step).

Each loads on first use, so a plain loop never imports transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_WHERE = {
    "FabricMonitor": "lightning_overtrain.frontends.fabric",
    "HFTrainerMonitor": "lightning_overtrain.frontends.hf",
    "LoopMonitor": "lightning_overtrain.frontends.loop",
}
__all__ = ["FabricMonitor", "HFTrainerMonitor", "LoopMonitor"]

if TYPE_CHECKING:
    from lightning_overtrain.frontends.fabric import FabricMonitor
    from lightning_overtrain.frontends.hf import HFTrainerMonitor
    from lightning_overtrain.frontends.loop import LoopMonitor


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
