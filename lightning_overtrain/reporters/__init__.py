"""Reporters: Lightning loggers, files, and (optionally) W&B extras."""

from lightning_overtrain.reporters.base import Reporter
from lightning_overtrain.reporters.files import FileReporter
from lightning_overtrain.reporters.loggers import LoggerReporter
from lightning_overtrain.reporters.plots import PlotReporter
from lightning_overtrain.reporters.wandb import WandbReporter

__all__ = ["FileReporter", "LoggerReporter", "PlotReporter", "Reporter", "WandbReporter"]
