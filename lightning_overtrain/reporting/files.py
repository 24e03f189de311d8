"""The history as files in the run's log directory: JSONL, CSV and the monitor's settings."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from lightning_overtrain.history import SETTINGS_FILE, write_history
from lightning_overtrain.reporting.base import Reporter, RunView
from lightning_overtrain.safe_io import write_json_atomic

if TYPE_CHECKING:
    import lightning.pytorch as pl


class FileReporter(Reporter):
    """Writes ``history.jsonl``, ``history.csv``, ``monitor.json`` and ``alerts.jsonl``.

    All go to ``view.dirpath``; ``alerts.jsonl`` gets one line per warning or stop.
    A resumed run writes the history it carries at once, so its new log directory
    holds the curves from the start before its next snapshot. Files are replaced
    atomically through exclusive temporary files; ``alerts.jsonl`` is appended to
    without following a symlink. A write that fails raises ``OSError``, which the
    monitor turns into a warning (see :mod:`lightning_overtrain.reporting.guard`).
    """

    def setup(self, trainer: pl.Trainer, view: RunView) -> None:
        os.makedirs(view.dirpath, exist_ok=True)
        write_json_atomic(os.path.join(view.dirpath, SETTINGS_FILE), dict(view.config))
        if view.history:
            write_history(list(view.history), view.dirpath)

    def report(self, trainer: pl.Trainer, view: RunView, record: dict[str, float]) -> None:
        write_history(view.history, view.dirpath)

    def alert(self, trainer: pl.Trainer, view: RunView, title: str, text: str, level: str) -> None:
        line = {
            "tokens": view.tokens,
            "step": trainer.global_step,
            "level": level,
            "title": title,
            "text": text,
        }
        path = os.path.join(view.dirpath, "alerts.jsonl")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
