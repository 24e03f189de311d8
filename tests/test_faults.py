"""Faults in the monitor's output are the monitor's problem, never training's (one process).

A full or unwritable directory, a failed best-snapshot write, a reporter's own bug,
an interrupted snapshot and a diverged run: training goes on bit for bit (or stops
only where the user asked), and the monitor says what was not written and why.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import LossRecorder, make_module, make_trainer, reference_batches, train_loader
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint

from lightning_overtrain import InflectionPolicy, NoiseProbe, OvertrainingMonitor, Probe
from lightning_overtrain.callbacks.remote import WatcherStop
from lightning_overtrain.core.keeping import BEST_FILE, replace_path
from lightning_overtrain.reporting.base import Reporter
from lightning_overtrain.reporting.guard import OUTPUT_FAILURES

STEPS, EVERY = 9, 3
HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def monitor(text: bytes, dirpath, **kwargs) -> OvertrainingMonitor:
    settings = {"probes": [NoiseProbe(gammas=(1.0,), pairs=1)], **kwargs}
    if "every_n_tokens" not in settings:
        settings.setdefault("every_n_steps", EVERY)
    return OvertrainingMonitor(reference_batches(text, n=2), dirpath=dirpath, **settings)


def fit(tmp_path, text, callbacks, max_steps=STEPS, ckpt_path=None, **trainer_kwargs):
    recorder = LossRecorder()
    trainer = make_trainer(tmp_path, [*callbacks, recorder], max_steps=max_steps, **trainer_kwargs)
    trainer.fit(make_module(), train_loader(text), ckpt_path=ckpt_path)
    return trainer, recorder.losses


@contextlib.contextmanager
def full_tmpfs(path):
    """A 1 MiB tmpfs at ``path``, filled to the last byte; skips where mounting is refused."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with contextlib.suppress(OSError), open(path / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def unwritable(tmp_path, kind: str):
    """A monitor directory no write can reach, as root too."""
    if kind == "under a file":
        (tmp_path / "a_file").write_text("x")
        return contextlib.nullcontext(tmp_path / "a_file" / "overtrain")
    return full_tmpfs(tmp_path / "full")


# ---------------------------------------------------------------------- output faults
@pytest.mark.parametrize("kind", ["full tmpfs", "under a file"])
def test_a_directory_nothing_can_be_written_to_never_changes_or_stops_training(
    tmp_path, code_text, kind
):
    _, plain = fit(tmp_path / "plain", code_text, [])
    with unwritable(tmp_path, kind) as directory:
        mon = monitor(code_text, directory)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer, losses = fit(tmp_path / "run", code_text, [mon])
    assert losses == plain and trainer.global_step == STEPS
    assert len(mon.history) == STEPS // EVERY  # every snapshot measured and kept in memory
    said = [str(w.message) for w in caught if "was not written" in str(w.message)]
    assert any("FileReporter" in s for s in said) and any("best snapshot" in s for s in said)
    assert all("Training goes on" in s for s in said)
    # Counted in the record: snapshot k sees the failures of the writes before it.
    counts = [r[OUTPUT_FAILURES] for r in mon.history]
    assert counts == sorted(counts) and counts[-1] > 0 and mon.output_failures > counts[-1]
    # The judgement stands: the policy kept the best snapshot, with no file named.
    assert mon.policy.best is not None and mon.best_path is None
    assert "best/tokens" in mon.history[-1]


def test_a_failed_best_write_leaves_the_previous_best_whole_and_the_judgement_kept(
    tmp_path, code_text
):
    mon = monitor(code_text, tmp_path / "mon")
    saves = []

    class FailsAfterTheFirstSave(LossRecorder):
        def on_fit_start(self, trainer, pl_module):
            real = trainer.strategy.save_checkpoint

            def save(checkpoint, path, *args, **kwargs):
                saves.append(path)
                if len(saves) > 1:  # half a file, then the disk is full
                    with open(path, "wb") as f:
                        f.write(b"PK\x03\x04 half")
                    raise OSError(28, "No space left on device")
                return real(checkpoint, path, *args, **kwargs)

            trainer.strategy.save_checkpoint = save

    with pytest.warns(UserWarning, match="the best snapshot .* was not written .*No space left"):
        fit(tmp_path, code_text, [mon, FailsAfterTheFirstSave()])
    assert len(saves) >= 2, "the best never moved after the first snapshot: nothing tested"
    best = tmp_path / "mon" / BEST_FILE
    kept = torch.load(best, weights_only=False)
    state = next(iter(kept["callbacks"].values()))
    assert [r["step"] for r in state["history"]] == [EVERY]  # the first best, whole
    assert mon.policy.best["step"] > EVERY and mon.best_path is None
    assert not [p for p in os.listdir(tmp_path / "mon") if p.endswith(".tmp")]
    assert all(os.path.dirname(p) == str(tmp_path / "mon") for p in saves)


def test_replacing_a_directory_checkpoint_keeps_the_old_one_until_the_new_one_is_in_place(
    tmp_path,
):
    old, new = tmp_path / "best.ckpt", tmp_path / ".best.ckpt.x.tmp"
    for directory, text in ((old, "old"), (new, "new")):
        directory.mkdir()
        (directory / "shard").write_text(text)
    replace_path(str(new), str(old))
    assert (old / "shard").read_text() == "new" and not new.exists()
    assert os.listdir(tmp_path) == ["best.ckpt"]
    file_new = tmp_path / "f.tmp"
    file_new.write_text("file")
    replace_path(str(file_new), str(old))  # a file replaces a directory checkpoint too
    assert old.read_text() == "file"


class Broken(Reporter):
    def setup(self, trainer, view):
        raise RuntimeError("setup bug")

    def report(self, trainer, view, record):
        raise ValueError("report bug")


def test_a_reporter_that_raises_is_warned_about_and_training_goes_on(tmp_path, code_text):
    _, plain = fit(tmp_path / "plain", code_text, [])
    mon = monitor(code_text, tmp_path / "mon", reporters=[Broken()])
    with pytest.warns(UserWarning, match=r"Broken's report output was not written \(ValueError"):
        _, losses = fit(tmp_path / "run", code_text, [mon])
    assert losses == plain and len(mon.history) == STEPS // EVERY
    assert mon.output_failures == 1 + STEPS // EVERY  # setup, then every report


# ---------------------------------------------------------------------- interrupted
class InterruptsOnce(Probe):
    """Raises at one snapshot, as a Ctrl-C or a kill signal's handler would."""

    name = "interrupts"

    def __init__(self, at_step: int) -> None:
        self.at_step, self.step = at_step, 0

    def run(self, ctx):
        self.step += EVERY
        if self.step == self.at_step:
            raise RuntimeError("interrupted")
        return {"interrupts/ok": 1.0}


@pytest.mark.parametrize("cadence", [{"every_n_steps": EVERY}, {"every_n_tokens": 256 * EVERY}])
def test_a_snapshot_interrupted_by_an_exception_is_taken_after_the_resume(
    tmp_path, code_text, cadence
):
    kwargs = dict(**cadence, probes=[InterruptsOnce(at_step=2 * EVERY)])
    first = monitor(code_text, tmp_path / "first", on_probe_error="raise", **kwargs)
    saved = OnExceptionCheckpoint(dirpath=str(tmp_path), filename="on_exception")
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(tmp_path / "a", code_text, [first, saved], enable_checkpointing=True)
    assert [r["step"] for r in first.history] == [EVERY]
    resumed = monitor(code_text, tmp_path / "second", **{**kwargs, "probes": [InterruptsOnce(0)]})
    ckpt = tmp_path / "on_exception.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resuming mid-epoch, as an interrupted run does
        fit(tmp_path / "b", code_text, [resumed], ckpt_path=str(ckpt))
    steps = [r["step"] for r in resumed.history]
    assert steps[:2] == [EVERY, 2 * EVERY + 1]  # taken again at the first step after resuming
    assert len(resumed.history) == 3


# ---------------------------------------------------------------------- diverged
class Diverges(Callback):
    """Sets the weights to NaN after step 4, as a blown-up run would."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == 4:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


@pytest.mark.parametrize("action", ["warn", "stop"])
def test_a_run_whose_reference_loss_is_not_finite_is_said_to_have_diverged(
    tmp_path, code_text, action
):
    mon = monitor(code_text, tmp_path / "mon", policy=InflectionPolicy(action=action))
    with pytest.warns(UserWarning, match=r"training diverged: the reference loss .* is nan"):
        trainer, _ = fit(tmp_path, code_text, [Diverges(), mon])
    assert mon.probe_failures == 0  # not a probe's fault
    if action == "stop":
        assert trainer.global_step == 2 * EVERY and "training diverged" in mon.stop_reason
    else:
        assert trainer.global_step == STEPS and mon.stop_reason is None


@pytest.mark.slow
def test_ctrl_c_in_a_probe_saves_a_checkpoint_that_retakes_the_snapshot(tmp_path):
    """A real KeyboardInterrupt (Lightning's graceful shutdown exits the process)."""
    code = f"""
    import torch
    from conftest import make_module, make_trainer, reference_batches, train_loader
    from lightning.pytorch.callbacks import OnExceptionCheckpoint
    from lightning_overtrain import OvertrainingMonitor, Probe
    from lightning_overtrain.testing.demo import stdlib_code

    class CtrlC(Probe):
        name = "ctrl_c"
        def run(self, ctx):
            raise KeyboardInterrupt

    text = stdlib_code(max_bytes=200_000)
    mon = OvertrainingMonitor(reference_batches(text, n=2), every_n_steps=3, probes=[CtrlC()],
                              dirpath={str(tmp_path / "mon")!r})
    saved = OnExceptionCheckpoint(dirpath={str(tmp_path)!r}, filename="on_exception")
    trainer = make_trainer({str(tmp_path)!r}, [mon, saved], max_steps=9, enable_checkpointing=True)
    trainer.fit(make_module(), train_loader(text))
    """
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{HERE}", "OMP_NUM_THREADS": "1"}
    command = ["timeout", "-s", "KILL", "120", sys.executable, "-c", textwrap.dedent(code)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "KeyboardInterrupt" in proc.stdout + proc.stderr
    checkpoint = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)
    state = next(iter(checkpoint["callbacks"].values()))
    assert checkpoint["global_step"] == EVERY and state["history"] == []
    assert state["cadence"]["retake"] is True  # the resumed run takes it at its first step


def test_a_watcher_stop_that_cannot_write_its_status_warns_and_training_goes_on(
    tmp_path, code_text
):
    (tmp_path / "a_file").write_text("x")
    stop = WatcherStop(tmp_path / "a_file" / "ckpt", min_interval_s=0)
    with pytest.warns(UserWarning, match="WatcherStop: the run's status 'running' was not written"):
        trainer, _ = fit(tmp_path, code_text, [stop], max_steps=3)
    assert trainer.global_step == 3
