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


def test_a_state_file_that_cannot_be_written_costs_only_that_file(tmp_path, code_text, monkeypatch):
    def full_disk(path, write, binary=False):
        raise OSError("No space left on device")

    monkeypatch.setattr("lightning_overtrain.frontends.hf.write_atomic", full_disk)
    monitor = HFTrainerMonitor(**settings(code_text, tmp_path, "hf"))
    trainer = hf_trainer(tmp_path / "run", batches_of(code_text), make_module(), 4,
                         save_strategy="steps", save_steps=2)  # fmt: skip
    monitor.attach(trainer)
    with pytest.warns(UserWarning, match="was not written .*No space left"):
        trainer.train()
    assert trainer.state.global_step == 4 and len(monitor.history) == 2
    assert monitor.output_failures == 2  # one per checkpoint, none of them fatal


def test_a_garbage_state_file_is_not_obeyed_and_starts_a_new_history(tmp_path, code_text):
    batches = batches_of(code_text)
    first = HFTrainerMonitor(**settings(code_text, tmp_path, "first"))
    trainer = hf_trainer(tmp_path / "run", batches, make_module(), 4,
                         save_strategy="steps", save_steps=4)  # fmt: skip
    first.attach(trainer)
    trainer.train()
    checkpoint = tmp_path / "run" / "hf" / "checkpoint-4"
    marker = tmp_path / "pwned"

    class Payload:  # a pickle that would run code if loaded without weights_only
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"history": Payload()}, checkpoint / "overtrain_monitor.pt")
    resumed = HFTrainerMonitor(**settings(code_text, tmp_path, "resumed"))
    trainer = hf_trainer(tmp_path / "run", batches, make_module(), len(batches))
    resumed.attach(trainer)
    with pytest.warns(UserWarning, match="could not be read as the monitor's state"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()
    assert [r["step"] for r in resumed.history] == [6]  # a new history, from the resume on


def test_the_cooldown_reads_the_trainers_own_optimizer_and_scheduler(tmp_path, code_text):
    from lightning_overtrain import ScheduleProbe

    batches = batches_of(code_text)
    arguments = settings(code_text, tmp_path, "hf")
    arguments["probes"] = [*arguments["probes"], ScheduleProbe()]
    # accelerate's AcceleratedOptimizer wraps torch's optimizer: the probes get torch's
    monitor = HFTrainerMonitor(**arguments, cooldown_steps=1, cooldown_data=batches[:1])
    trainer = run_hf(tmp_path, batches, monitor)[1]
    assert len(monitor.history) == 3 and monitor.probe_failures == 0
    assert all("cooldown/raw_reference_loss" in r for r in monitor.history)
    assert all(r["schedule/phase"] in (0, 1, 2) for r in monitor.history)
    extras = monitor.core.context().extras
    assert extras["lr_scheduler"] is trainer.lr_scheduler
    assert type(extras["optimizer"]).__module__.startswith("torch.optim")
