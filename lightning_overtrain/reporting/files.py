"""The history as files in the run's log directory: JSONL, CSV and the monitor's settings."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from lightning_overtrain.history import SETTINGS_FILE, write_history
from lightning_overtrain.reporting.base import Reporter

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_overtrain.callbacks.monitor import OvertrainingMonitor


class FileReporter(Reporter):
    """Writes ``history.jsonl``, ``history.csv``, ``monitor.json`` and ``alerts.jsonl``.

    All go to ``monitor.dirpath``; ``alerts.jsonl`` gets one line per warning or stop.
    A resumed run writes the history it carries at once, so its new log directory
    holds the curves from the start before its next snapshot.
    """

    def setup(self, trainer: pl.Trainer, monitor: OvertrainingMonitor) -> None:
        os.makedirs(monitor.dirpath, exist_ok=True)
        with open(os.path.join(monitor.dirpath, SETTINGS_FILE), "w") as f:
            json.dump(monitor.config(), f, indent=2, default=str)
        if monitor.history:
            write_history(monitor.history, monitor.dirpath)

    def report(
        self, trainer: pl.Trainer, monitor: OvertrainingMonitor, record: dict[str, float]
    ) -> None:
        write_history(monitor.history, monitor.dirpath)

    def alert(
        self, trainer: pl.Trainer, monitor: OvertrainingMonitor, title: str, text: str, level: str
    ) -> None:
        line = {
            "tokens": monitor.tokens,
            "step": trainer.global_step,
            "level": level,
            "title": title,
            "text": text,
        }
        with open(os.path.join(monitor.dirpath, "alerts.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
