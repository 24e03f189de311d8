"""Reporters: Lightning loggers, files, and (optionally) W&B extras."""

from lightning_overtrain.reporters.base import Reporter
from lightning_overtrain.reporters.files import FileReporter
from lightning_overtrain.reporters.loggers import LoggerReporter

__all__ = ["FileReporter", "LoggerReporter", "Reporter"]
