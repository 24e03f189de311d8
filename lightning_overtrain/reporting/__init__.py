"""Reporters: Lightning loggers, files, and (optionally) W&B extras."""

from lightning_overtrain.reporting.base import Reporter
from lightning_overtrain.reporting.console import ConsoleReporter
from lightning_overtrain.reporting.files import FileReporter
from lightning_overtrain.reporting.loggers import LoggerReporter
from lightning_overtrain.reporting.png import PlotReporter
from lightning_overtrain.reporting.wandb import WandbReporter

__all__ = [
    "ConsoleReporter",
    "FileReporter",
    "LoggerReporter",
    "PlotReporter",
    "Reporter",
    "WandbReporter",
]
