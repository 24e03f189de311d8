"""The run's files: a resumed run's new log directory holds the history at once."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import pytest
from conftest import history_text, make_module, make_trainer, reference_batches, train_loader

from lightning_overtrain import OvertrainingMonitor, read_history
from lightning_overtrain.engine.data import fingerprint_batches
from lightning_overtrain.history import SETTINGS_FILE


class FilesAtTrainStart(pl.Callback):
    """What the monitor's directory holds when training starts, before any snapshot."""

    def __init__(self, monitor: OvertrainingMonitor) -> None:
        self.monitor = monitor
        self.history: list[dict] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        jsonl, csv = (os.path.join(self.monitor.dirpath, f"history.{e}") for e in ("jsonl", "csv"))
        self.history = (
            read_history(jsonl) if os.path.isfile(jsonl) and os.path.isfile(csv) else None
        )


# Resuming at step 4 of an epoch is what this test wants; the data order does not matter here.
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch")
def test_a_resumed_run_writes_its_history_files_before_the_next_snapshot(tmp_path, code_text):
    ref = reference_batches(code_text, n=2)
    first = OvertrainingMonitor(ref, every_n_steps=2)
    trainer = make_trainer(tmp_path / "first", [first], max_steps=4)
    trainer.fit(make_module(), train_loader(code_text))
    assert len(first.history) == 2
    ckpt = tmp_path / "at4.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = OvertrainingMonitor(ref, every_n_steps=2)  # its directory: the new run's
    probe = FilesAtTrainStart(resumed)
    trainer = make_trainer(tmp_path / "resumed", [resumed, probe], max_steps=5)
    trainer.fit(make_module(seed=1), train_loader(code_text), ckpt_path=ckpt)
    assert resumed.dirpath != first.dirpath and len(resumed.history) == 2  # no new snapshot
    assert probe.history is not None, "no history files in the resumed run's directory"
    assert history_text(probe.history) == history_text(first.history)
    # The settings record what the reference set holds, as the CLI does.
    settings = json.loads((tmp_path / "resumed" / "overtrain" / SETTINGS_FILE).read_text())
    assert settings["reference_fingerprint"] == fingerprint_batches(ref)
