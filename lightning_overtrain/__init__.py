"""lightning-overtrain: watch a pretraining run for catastrophic overtraining, live.

Public API::

    from lightning_overtrain import OvertrainingMonitor, NoiseProbe
"""

from lightning_overtrain.callbacks.cadence import Cadence
from lightning_overtrain.callbacks.monitor import OvertrainingMonitor
from lightning_overtrain.engine.backup import ModelBackup, borrowed
from lightning_overtrain.engine.init_std import init_std_from_weights
from lightning_overtrain.engine.losses import transformers_loss
from lightning_overtrain.engine.tokens import count_tokens
from lightning_overtrain.history import read_history, write_history
from lightning_overtrain.inflection.detector import InflectionDetector, InflectionState
from lightning_overtrain.inflection.policy import Decision, InflectionPolicy
from lightning_overtrain.probes import (
    FineTuneProbe,
    NoiseProbe,
    Probe,
    ProbeContext,
    ProbeFailure,
    perturb_,
)
from lightning_overtrain.probes.layers import infer_layer_groups
from lightning_overtrain.reporting import (
    FileReporter,
    LoggerReporter,
    PlotReporter,
    Reporter,
    WandbReporter,
)
from lightning_overtrain.reporting.figures import render_figures, write_figures

__version__ = "0.1.0.dev0"

__all__ = [
    "Cadence",
    "Decision",
    "FileReporter",
    "FineTuneProbe",
    "InflectionDetector",
    "InflectionPolicy",
    "InflectionState",
    "LoggerReporter",
    "ModelBackup",
    "NoiseProbe",
    "OvertrainingMonitor",
    "PlotReporter",
    "Probe",
    "ProbeContext",
    "ProbeFailure",
    "Reporter",
    "WandbReporter",
    "__version__",
    "borrowed",
    "count_tokens",
    "infer_layer_groups",
    "init_std_from_weights",
    "perturb_",
    "read_history",
    "render_figures",
    "transformers_loss",
    "write_figures",
    "write_history",
]
