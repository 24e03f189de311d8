"""The monitor as a Hugging Face ``TrainerCallback``: the numbers of the plain loop, no trace."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import history_text, make_module
from frontend_runs import hf_trainer, run_hf, run_loop
from test_frontends import batches_of, settings

from lightning_overtrain import HFTrainerMonitor, LoopMonitor

pytest.importorskip("accelerate")


@pytest.mark.parametrize("count", ["no", "all"], ids=["from-batches", "trainer-count"])
def test_the_trainer_records_what_the_plain_loop_records(tmp_path, code_text, count):
    batches = batches_of(code_text)
    loop = LoopMonitor(**settings(code_text, tmp_path, "loop"))
    loop_weights, _ = run_loop(batches, loop)
    hf = HFTrainerMonitor(**settings(code_text, tmp_path, "hf"))
    hf_weights, _ = run_hf(tmp_path, batches, hf, include_num_input_tokens_seen=count)
    assert len(hf.history) == 3
    assert history_text(hf.history) == history_text(loop.history)
    assert all(torch.equal(loop_weights[k], hf_weights[k]) for k in loop_weights)


def test_training_is_bit_identical_with_the_callback_on(tmp_path, code_text):
    batches = batches_of(code_text)
    without, _ = run_hf(tmp_path / "off", batches)
    monitor = HFTrainerMonitor(**settings(code_text, tmp_path, "hf"))
    with_monitor, _ = run_hf(tmp_path / "on", batches, monitor)
    assert all(torch.equal(without[k], with_monitor[k]) for k in without)


def test_snapshots_are_logged_through_trainer_log(tmp_path, code_text):
    monitor = HFTrainerMonitor(**settings(code_text, tmp_path, "hf"))
    monitor.core.user_reporters = None  # the default reporters, LoggerReporter among them
    _, trainer = run_hf(tmp_path, batches_of(code_text), monitor)
    rows = [r for r in trainer.state.log_history if "overtrain/tokens" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert [r["overtrain/reference_loss"] for r in rows] == [
        r["reference_loss"] for r in monitor.history
    ]


def test_resuming_from_a_checkpoint_continues_the_same_history(tmp_path, code_text):
    batches = batches_of(code_text)
    whole = HFTrainerMonitor(**settings(code_text, tmp_path, "whole"))
    run_hf(tmp_path / "whole", batches, whole)

    first = HFTrainerMonitor(**settings(code_text, tmp_path, "first"))
    module = make_module()
    trainer = hf_trainer(tmp_path / "run", batches, module, 4, save_strategy="steps", save_steps=4)
    first.attach(trainer)
    trainer.train()
    checkpoint = tmp_path / "run" / "hf" / "checkpoint-4"
    assert os.path.isfile(checkpoint / "overtrain_monitor.pt")

    resumed = HFTrainerMonitor(**settings(code_text, tmp_path, "resumed"))
    trainer = hf_trainer(tmp_path / "run", batches, make_module(), len(batches))
    resumed.attach(trainer)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert history_text(resumed.history) == history_text(whole.history)
