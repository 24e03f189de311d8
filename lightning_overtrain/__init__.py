"""lightning-overtrain: watch a pretraining run for catastrophic overtraining, live.

The public API is the names a user writes::

    from lightning_overtrain import NoiseProbe, OvertrainingMonitor

(or ``FabricMonitor``, ``HFTrainerMonitor``, ``LoopMonitor``: the same monitor for a
Fabric loop, the Hugging Face ``Trainer`` or a plain PyTorch loop).

Everything else is imported from its module, e.g.
``from lightning_overtrain.reporting import PlotReporter`` or
``from lightning_overtrain.engine.backup import ModelBackup``.

The names load on first use (PEP 562): ``import lightning_overtrain`` alone, and the
``lightning-overtrain`` command's ``--help``, import neither torch nor Lightning.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# Each public name and the module that defines it.
_LAZY = {
    "OvertrainingMonitor": "lightning_overtrain.callbacks.monitor",
    "NoiseProbe": "lightning_overtrain.probes.noise",
    "FineTuneProbe": "lightning_overtrain.probes.finetune",
    "InflectionPolicy": "lightning_overtrain.inflection.policy",
    "InflectionDetector": "lightning_overtrain.inflection.detector",
    "Probe": "lightning_overtrain.engine.contract",
    "ProbeContext": "lightning_overtrain.engine.contract",
    "ProbeFailure": "lightning_overtrain.engine.contract",
    "Reporter": "lightning_overtrain.reporting.base",
    "read_history": "lightning_overtrain.history",
    "SharpnessProbe": "lightning_overtrain.probes.sharpness",
    "WatcherStop": "lightning_overtrain.callbacks.remote",
    "Signal": "lightning_overtrain.keys",
    "FabricMonitor": "lightning_overtrain.frontends.fabric",
    "HFTrainerMonitor": "lightning_overtrain.frontends.hf",
    "LoopMonitor": "lightning_overtrain.frontends.loop",
    "DetectorConfig": "lightning_overtrain.inflection.config",
    "ScheduleProbe": "lightning_overtrain.probes.schedule",
}

# Written out, not computed, so linters and type checkers read it.
__all__ = [
    "DetectorConfig",
    "FabricMonitor",
    "FineTuneProbe",
    "HFTrainerMonitor",
    "InflectionDetector",
    "InflectionPolicy",
    "LoopMonitor",
    "NoiseProbe",
    "OvertrainingMonitor",
    "Probe",
    "ProbeContext",
    "ProbeFailure",
    "Reporter",
    "ScheduleProbe",
    "SharpnessProbe",
    "Signal",
    "WatcherStop",
    "__version__",
    "read_history",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads them
    from lightning_overtrain.callbacks.monitor import OvertrainingMonitor
    from lightning_overtrain.callbacks.remote import WatcherStop
    from lightning_overtrain.engine.contract import Probe, ProbeContext, ProbeFailure
    from lightning_overtrain.frontends.fabric import FabricMonitor
    from lightning_overtrain.frontends.hf import HFTrainerMonitor
    from lightning_overtrain.frontends.loop import LoopMonitor
    from lightning_overtrain.history import read_history
    from lightning_overtrain.inflection.config import DetectorConfig
    from lightning_overtrain.inflection.detector import InflectionDetector
    from lightning_overtrain.inflection.policy import InflectionPolicy
    from lightning_overtrain.keys import Signal
    from lightning_overtrain.probes.finetune import FineTuneProbe
    from lightning_overtrain.probes.noise import NoiseProbe
    from lightning_overtrain.probes.schedule import ScheduleProbe
    from lightning_overtrain.probes.sharpness import SharpnessProbe
    from lightning_overtrain.reporting.base import Reporter


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
