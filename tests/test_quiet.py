"""Quiet by default: the third-party tips and banners a run leaves out, one test per filter.

Each test also shows the noise without the filter, so it fails if the noise comes back
under another wording.
"""

import logging
import os
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
from conftest import make_module, make_trainer, reference_batches, train_loader
from lightning.pytorch.callbacks import RichProgressBar

from lightning_overtrain import NoiseProbe, OvertrainingMonitor
from lightning_overtrain.reporting import loggers
from lightning_overtrain.reporting.progress import label_epochs_of_a_steps_run

TRAINER = """
import logging, sys
logging.basicConfig(stream=sys.stdout, level=logging.INFO)
{imports}
import lightning.pytorch as pl
pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
"""


def trainer_output(imports: str, env: dict | None = None) -> str:
    code = TRAINER.format(imports=imports)
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert run.returncode == 0, run.stderr
    return run.stdout + run.stderr


def test_the_litlogger_tip_is_dropped_by_name():
    assert "litlogger" in trainer_output("")  # Lightning's own: the noise exists
    quiet = trainer_output("import lightning_overtrain.callbacks.monitor")
    assert "litlogger" not in quiet and "Tip" not in quiet
    assert "GPU available" in quiet  # Lightning's other lines still show


def test_the_litlogger_tip_shows_when_asked():
    asked = trainer_output("import lightning_overtrain.callbacks.monitor", {loggers.TIPS_ENV: "1"})
    assert "litlogger" in asked


def test_the_tip_filter_drops_nothing_else():
    def record(message):
        return logging.LogRecord("x", logging.INFO, "", 0, message, None, None)

    assert loggers.LITLOGGER_TIP.name == "lightning-overtrain: litlogger tip"
    assert not loggers.LITLOGGER_TIP.filter(record("💡 Tip: try installing litlogger now"))
    assert loggers.LITLOGGER_TIP.filter(record("💡 Tip: use fewer threads"))
    assert loggers.LITLOGGER_TIP.filter(record("GPU available: False, used: False"))


def wandb_output(tmp_path, settings):
    code = textwrap.dedent(
        f"""
        import wandb
        run = wandb.init(mode="offline", dir={str(tmp_path)!r}, project="p", settings={settings!r})
        for i in range(3):
            run.log({{"loss": float(i)}})
        run.finish()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}  # conftest silences W&B
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr
    return run.stdout + run.stderr


def test_wandb_quiet_leaves_out_the_summary_block(tmp_path):
    pytest.importorskip("wandb")
    assert "Run history" in wandb_output(tmp_path / "loud", {})  # W&B's own: the noise exists
    quiet = wandb_output(tmp_path / "quiet", loggers.WANDB_QUIET)
    assert "Run history" not in quiet and "Run summary" not in quiet


def test_the_watchers_wandb_run_and_the_example_are_quiet(monkeypatch, capsys):
    import argparse

    wandb = pytest.importorskip("wandb")
    from lightning_overtrain.cli.watch_wandb import WandbLog

    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(wandb, "init", init)
    args = argparse.Namespace(wandb_project="p", wandb_entity=None, out=".")
    assert WandbLog(args, {"wandb_run_id": "abc"}, {}).run is None
    assert seen["settings"] == loggers.WANDB_QUIET
    with open(os.path.join(os.path.dirname(__file__), "..", "examples", "pretrain_tiny.py")) as f:
        assert "settings=WANDB_SILENT" in f.read()


def test_the_main_jobs_wandb_settings_leave_out_the_offline_notice(tmp_path):
    pytest.importorskip("wandb")
    assert "syncing is set to `offline`" in wandb_output(tmp_path / "loud", loggers.WANDB_QUIET)
    silent = wandb_output(tmp_path / "silent", loggers.WANDB_SILENT)
    assert "offline" not in silent and "Run history" not in silent


def test_a_max_steps_run_has_no_negative_epoch_in_its_progress_bar(tmp_path, code_text):
    bar = RichProgressBar()
    monitor = OvertrainingMonitor(
        reference_data=reference_batches(code_text),
        every_n_steps=2,
        probes=[NoiseProbe(gammas=(1.0,), pairs=1)],
    )
    trainer = make_trainer(tmp_path, [monitor, bar], max_steps=2, enable_progress_bar=True)
    trainer.fit(make_module(0), train_loader(code_text))
    assert bar._get_train_description(0).strip() == "Epoch 0"
    lightnings_own = RichProgressBar._get_train_description(bar, 0)
    assert lightnings_own.strip() == "Epoch 0/-2"  # the noise exists


def test_a_bounded_epochs_run_keeps_its_label():
    bar = RichProgressBar()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, callbacks=[bar], enable_model_summary=False
    )
    bar._trainer = trainer
    label_epochs_of_a_steps_run(trainer)
    assert bar._get_train_description(0).strip() == "Epoch 0/2"
