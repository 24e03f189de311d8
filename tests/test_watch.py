"""``lightning-overtrain watch``: a live run's checkpoints probed from another process.

In-process tests run the watcher over a finished run's directory (its
``overtrain_run.json`` says so, or ``--idle-timeout 0``); the slow one runs the
training and the watcher as two processes at once.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import CONTEXT, make_module, make_trainer, reference_batches, train_loader
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_overtrain import keys
from lightning_overtrain.callbacks.monitor import OvertrainingMonitor
from lightning_overtrain.callbacks.remote import RUN_FILE, STOP_FILE, WatcherStop, read_json
from lightning_overtrain.cli import watch as watch_module
from lightning_overtrain.cli.follow import Follower
from lightning_overtrain.cli.main import main
from lightning_overtrain.cli.probe import probe_checkpoint
from lightning_overtrain.history import read_history
from lightning_overtrain.probes.noise import NoiseProbe

BATCH, EVERY, STEPS = 8, 4, 12
GAMMAS, PAIRS = ("0.5", "1.0"), 2
MODULE_CLASS = "lightning_overtrain.testing.demo:TinyCausalLM"
HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, code_text: bytes) -> dict[str, Any]:
    """A finished run: .ckpt files at steps 4, 8, 12, its monitor's history, its status file."""
    root = tmp_path_factory.mktemp("watched")
    ref_file = root / "reference.bin"
    ref_file.write_bytes(code_text[-CONTEXT * BATCH * 2 :])  # the bytes of the monitor's set
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=2, batch_size=BATCH),
        every_n_steps=EVERY,
        probes=[NoiseProbe(gammas=tuple(map(float, GAMMAS)), pairs=PAIRS)],
        dirpath=root / "monitor",
    )
    ckpts = ModelCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=EVERY, save_top_k=-1, filename="{step}"
    )
    callbacks = [monitor, WatcherStop(root / "ckpt"), ckpts]
    trainer = make_trainer(root, callbacks, max_steps=STEPS, enable_checkpointing=True)
    trainer.fit(make_module(), train_loader(code_text, batch_size=BATCH))
    return {"ckpt_dir": root / "ckpt", "history": monitor.history, "ref_file": str(ref_file)}


def watch_args(run: dict[str, Any], directory: Path, out: Path, *extra: str) -> list[str]:
    return [
        "watch",
        str(directory),
        "--out",
        str(out),
        "--module-class",
        MODULE_CLASS,
        "--reference-text",
        run["ref_file"],
        "--tokenizer",
        "bytes",
        "--context",
        str(CONTEXT),
        "--batch-size",
        str(BATCH),
        "--gammas",
        *GAMMAS,
        "--pairs",
        str(PAIRS),
        "--device",
        "cpu",
        "--poll",
        "0.05",
        *extra,
    ]


def copy_ckpts(run: dict[str, Any], to: Path, *steps: int) -> Path:
    """Some of the run's checkpoints, without its status file (so `--idle-timeout` ends it)."""
    to.mkdir(parents=True, exist_ok=True)
    for step in steps:
        shutil.copy(run["ckpt_dir"] / f"step={step}.ckpt", to)
    return to


def assert_same_numbers(watched: list[dict], live: list[dict]) -> None:
    assert [r[keys.TOKENS] for r in watched] == [r[keys.TOKENS] for r in live]
    for got, want in zip(watched, live):
        names = [k for k in want if "/" in k or k == keys.REFERENCE_LOSS]
        assert "inflection/noise/gamma=1/perturbed_loss/bottom_tokens" in names
        assert "best/tokens" in names and got[keys.STEP] == want[keys.STEP]
        for key in names:
            if isinstance(want[key], list):  # a probe's per-sample values
                assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
                continue
            same = math.isnan(got[key]) and math.isnan(want[key])
            assert same or math.isclose(got[key], want[key], rel_tol=1e-9, abs_tol=1e-12), key


# ---------------------------------------------------------------------- following
def test_a_finished_run_is_probed_like_the_monitor_and_the_watcher_stops(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(watch_args(run, run["ckpt_dir"], out)) == 0  # no timeout: the status ends it
    assert_same_numbers(read_history(str(out / "history.jsonl")), run["history"])
    text = capsys.readouterr().out
    assert text.count("probed ") == 3 and "the run has finished" in text
    best = int(run["history"][-1]["best/tokens"]) // (BATCH * CONTEXT)
    assert f"(to fine-tune): {os.path.abspath(run['ckpt_dir'] / f'step={best}.ckpt')}" in text
    assert {"summary.md", "inflection.json", "watch.json"} <= set(os.listdir(out))
    assert (out / "plots" / "noise.png").is_file()


def test_a_restart_probes_nothing_twice_and_skips_nothing(run, tmp_path, monkeypatch):
    directory, out = copy_ckpts(run, tmp_path / "ckpt", 4, 8), tmp_path / "out"
    args = watch_args(run, directory, out, "--idle-timeout", "0")
    assert main(args) == 0
    first = read_history(str(out / "history.jsonl"))
    copy_ckpts(run, directory, 12)
    probed = []

    def counted(setup, ckpt, *a, **kw):
        probed.append(os.path.basename(ckpt.path))
        return probe_checkpoint(setup, ckpt, *a, **kw)

    monkeypatch.setattr(watch_module, "probe_checkpoint", counted)
    assert main(args) == 0
    second = read_history(str(out / "history.jsonl"))
    assert probed == ["step=12.ckpt"]
    assert [r[keys.PROBE_SECONDS] for r in second[:2]] == [r[keys.PROBE_SECONDS] for r in first]
    assert_same_numbers(second, run["history"])


def test_a_growing_checkpoint_is_not_ready_until_it_stops_changing(run, tmp_path):
    data = (run["ckpt_dir"] / "step=4.ckpt").read_bytes()
    path = tmp_path / "step=4.ckpt"
    follower = Follower(str(tmp_path))
    path.write_bytes(data[: len(data) // 2])
    assert follower.poll().ready == []  # first sight
    path.write_bytes(data)
    assert follower.poll().ready == []  # changed since
    (ready, _), *_ = follower.poll().ready
    assert ready.path == str(path)


def test_a_half_written_checkpoint_is_reported_then_probed_once_complete(run, tmp_path, capsys):
    data = (run["ckpt_dir"] / "step=8.ckpt").read_bytes()
    directory, out = copy_ckpts(run, tmp_path / "ckpt", 4), tmp_path / "out"
    (directory / "step=8.ckpt").write_bytes(data[: len(data) // 2])  # stalled mid-copy
    args = watch_args(run, directory, out, "--idle-timeout", "0")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "cannot probe" in err and "step=8.ckpt: unreadable" in err
    assert len(read_history(str(out / "history.jsonl"))) == 1
    (directory / "step=8.ckpt").write_bytes(data)
    assert main(args) == 0  # tried again: its files changed
    assert_same_numbers(read_history(str(out / "history.jsonl")), run["history"][:2])


def test_a_checkpoint_deleted_before_it_was_probed_is_reported(run, tmp_path, monkeypatch, capsys):
    directory, out = copy_ckpts(run, tmp_path / "ckpt", 4, 8, 12), tmp_path / "out"

    class DeletesAfterFirstPoll(Follower):  # save_top_k removing a file the watcher has seen
        def poll(self):
            result = super().poll()
            if (directory / "step=8.ckpt").exists():
                os.remove(directory / "step=8.ckpt")
            return result

    monkeypatch.setattr(watch_module, "Follower", DeletesAfterFirstPoll)
    assert main(watch_args(run, directory, out, "--idle-timeout", "0")) == 0
    assert "step=8.ckpt was deleted before it could be probed" in capsys.readouterr().out
    history = read_history(str(out / "history.jsonl"))
    assert [r[keys.STEP] for r in history] == [4, 12]


def test_tokens_that_go_backwards_are_probed_in_order_and_flagged(run, tmp_path, capsys):
    directory, out = copy_ckpts(run, tmp_path / "ckpt", 8), tmp_path / "out"
    args = watch_args(run, directory, out, "--idle-timeout", "0")
    assert main(args) == 0
    copy_ckpts(run, directory, 4)
    assert main(args) == 1
    assert "the token count went backwards" in capsys.readouterr().err
    assert_same_numbers(read_history(str(out / "history.jsonl")), run["history"][:2])


def test_save_pretrained_directories_are_followed_too(run, tmp_path):
    from lightning_overtrain.testing.demo import TinyCausalLM

    for step in (4, 8):
        module = TinyCausalLM.load_from_checkpoint(run["ckpt_dir"] / f"step={step}.ckpt")
        module.model.save_pretrained(tmp_path / "hf" / f"step-{step:04d}")
    tokens = ["--tokens-pattern", r"step-(?P<step>\d+)", "--tokens-per-step", str(BATCH * CONTEXT)]
    args = watch_args(run, tmp_path / "hf", tmp_path / "out", "--idle-timeout", "0", *tokens)
    assert main([*args, "--init-std", "0.02"]) == 0
    watched = read_history(str(tmp_path / "out" / "history.jsonl"))
    assert [r[keys.STEP] for r in watched] == [4, 8]
    for got, want in zip(watched, run["history"]):
        assert math.isclose(got[keys.REFERENCE_LOSS], want[keys.REFERENCE_LOSS], rel_tol=1e-9)


def test_help_names_the_files_between_the_run_and_the_watcher(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["watch", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and "--idle-timeout" in text and "--threshold" in text
    assert "overtrain_stop.json" in text and "WatcherStop" in text and "examples:" in text


# ---------------------------------------------------------------------- bad input
def test_a_directory_that_does_not_exist_yet_is_waited_for(run, tmp_path, monkeypatch, capsys):
    directory, out = tmp_path / "later" / "ckpt", tmp_path / "out"
    polls = []

    class RunStartsLater(Follower):  # the run creates its directory after the watcher starts
        def poll(self):
            polls.append(1)
            if len(polls) == 1:  # after the watcher said it waits
                copy_ckpts(run, directory, 4, 8)
            return super().poll()

    monkeypatch.setattr(watch_module, "Follower", RunStartsLater)
    assert main(watch_args(run, directory, out, "--idle-timeout", "0")) == 0
    text = capsys.readouterr().out
    assert f"waiting for {directory} to be created" in text
    assert f"{directory} exists now" in text and text.count("probed ") == 2
    assert_same_numbers(read_history(str(out / "history.jsonl")), run["history"][:2])


def test_a_dir_that_is_a_file_is_a_usage_error(run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(watch_args(run, tmp_path / "file", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and len(err.strip().splitlines()) == 1


def test_fifos_are_never_opened_and_symlinks_out_of_the_tree_are_skipped(run, tmp_path, capsys):
    directory, out = copy_ckpts(run, tmp_path / "ckpt", 4), tmp_path / "out"
    os.mkfifo(directory / "step=8.ckpt")  # opening it would block the watcher for good
    elsewhere = copy_ckpts(run, tmp_path / "elsewhere", 12)
    os.symlink(elsewhere / "step=12.ckpt", directory / "outside.ckpt")
    os.symlink(directory / "step=4.ckpt", directory / "last.ckpt")  # inside: its target counts
    assert main(watch_args(run, directory, out, "--idle-timeout", "0")) == 0
    captured = capsys.readouterr()
    assert "step=8.ckpt: not a regular file" in captured.err
    assert "outside.ckpt: a symlink to" in captured.err and "outside the watched" in captured.err
    assert captured.out.count("probed ") == 1
    assert [r[keys.STEP] for r in read_history(str(out / "history.jsonl"))] == [4]


def test_other_settings_than_the_existing_history_are_refused(run, tmp_path, capsys):
    directory, out = copy_ckpts(run, tmp_path / "ckpt", 4), tmp_path / "out"
    args = watch_args(run, directory, out, "--idle-timeout", "0")
    assert main(args) == 0
    args[args.index("--pairs") + 1] = "3"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--out" in err


def test_a_bad_threshold_is_a_usage_error(run, tmp_path, capsys):
    args = watch_args(run, tmp_path, tmp_path / "out", "--threshold", "reference_loss")
    assert main(args) == 2
    assert "--threshold 'reference_loss': write it as KEY=LIMIT" in capsys.readouterr().err


# ---------------------------------------------------------------------- acting
def test_a_stop_without_watcher_stop_only_warns(run, tmp_path, capsys):
    directory, out = copy_ckpts(run, tmp_path / "ckpt", 4), tmp_path / "out"
    extra = ["--idle-timeout", "0", "--action", "stop", "--threshold", "reference_loss=0"]
    assert main(watch_args(run, directory, out, *extra)) == 0
    err = capsys.readouterr().err
    assert "STOP: reference_loss" in err and "no WatcherStop callback" in err
    decision = read_json(str(directory / STOP_FILE))
    assert decision["signal"] == "reference_loss" and "exceeds its threshold" in decision["reason"]
    assert json.loads((out / "alerts.jsonl").read_text())["level"] == "stop"


def test_wandb_run_is_resumed_by_id_after_a_restart(run, tmp_path, monkeypatch):
    inits, logged = [], []

    class Run:
        def define_metric(self, *a, **kw):
            pass

        def log(self, row):
            logged.append(row)

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or Run())  # as wandb 0.31
    monkeypatch.setitem(sys.modules, "wandb", fake)
    directory, out = copy_ckpts(run, tmp_path / "ckpt", 4), tmp_path / "out"
    args = watch_args(run, directory, out, "--idle-timeout", "0", "--wandb-project", "p")
    assert main(args) == 0
    copy_ckpts(run, directory, 8)
    assert main(args) == 0
    first, second = (i["id"] for i in inits)
    assert first == second and re.fullmatch(r"[0-9a-f]{8}", first)  # the id kept in watch.json
    assert inits[1]["resume"] == "allow"
    assert [row["overtrain/tokens"] for row in logged] == [r["tokens"] for r in run["history"][:2]]


def test_watcher_stop_stops_at_the_next_step_and_ignores_a_stale_decision(tmp_path, code_text):
    (tmp_path / STOP_FILE).write_text('{"reason": "an earlier fit"}')

    class Decides(Callback):  # the watcher, deciding after step 3
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                time.sleep(0.01)  # a new mtime
                (tmp_path / STOP_FILE).write_text('{"reason": "too sharp"}')

    stop = WatcherStop(tmp_path, min_interval_s=0)
    trainer = make_trainer(tmp_path, [stop, Decides()], max_steps=10)
    trainer.fit(make_module(), train_loader(code_text, batch_size=BATCH))
    # Decides runs after WatcherStop at step 3: the check of step 4 sees it.
    assert trainer.global_step == 4 and stop.stop_reason == "too sharp"
    assert read_json(str(tmp_path / RUN_FILE))["status"] == "finished"


def test_watcher_stop_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="check_every_n_steps"):
        WatcherStop(tmp_path, check_every_n_steps=0)
    with pytest.raises(ValueError, match="min_interval_s"):
        WatcherStop(tmp_path, min_interval_s=-1)


# ---------------------------------------------------------------------- two processes
def _watcher(run: dict[str, Any], directory: Path, out: Path, log: Path) -> subprocess.Popen:
    args = watch_args(run, directory, out, "--poll", "0.2", "--action", "stop")
    cmd = [sys.executable, "-m", "lightning_overtrain.cli", *args, "--threshold", "step=11"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV)


@pytest.mark.slow
def test_live_watcher_matches_the_monitor_survives_a_kill_and_stops_the_run(run, tmp_path):
    directory, out, mon = tmp_path / "ckpt", tmp_path / "out", tmp_path / "monitor"
    directory.mkdir()
    script = [sys.executable, str(HERE / "watch_run.py"), "--dir", str(directory)]
    settings = ["--monitor-dir", str(mon), "--steps", "20", "--every", str(EVERY)]
    training = subprocess.Popen(
        [*script, *settings, "--pace", str(out)],
        stdout=(tmp_path / "train.log").open("w"),
        stderr=subprocess.STDOUT,
        env=ENV,
    )
    try:
        first = _watcher(run, directory, out, tmp_path / "watch1.log")
        deadline = time.monotonic() + 120
        while not (out / "history.jsonl").exists():  # killed once it has probed one
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        before = read_history(str(out / "history.jsonl"))
        second = _watcher(run, directory, out, tmp_path / "watch2.log")
        assert second.wait(180) == 0, (tmp_path / "watch2.log").read_text()
        assert training.wait(60) == 0, (tmp_path / "train.log").read_text()
    finally:
        for proc in (training, first, second if "second" in locals() else None):
            if proc is not None and proc.poll() is None:
                proc.kill()
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    result = json.loads((mon / "result.json").read_text())
    # The decision came at the step-12 checkpoint; the run stopped at the next step.
    assert result["global_step"] == 13 and "step = 12 exceeds" in result["stop_reason"], logs
    watched = read_history(str(out / "history.jsonl"))
    assert_same_numbers(watched, read_history(str(mon / "history.jsonl")))
    assert [r[keys.STEP] for r in watched] == [4, 8, 12]  # none skipped, none twice
    kept = {r[keys.TOKENS]: r[keys.PROBE_SECONDS] for r in watched}
    assert all(kept[r[keys.TOKENS]] == r[keys.PROBE_SECONDS] for r in before)  # not re-probed


@pytest.mark.slow
def test_watcher_stop_under_ddp_stops_every_rank_at_the_same_step(tmp_path):
    directory, mon = tmp_path / "ckpt", tmp_path / "monitor"
    cmd = [sys.executable, str(HERE / "watch_run.py"), "--dir", str(directory)]
    cmd += ["--monitor-dir", str(mon), "--steps", "20", "--no-monitor", "--devices", "2"]
    proc = subprocess.run(
        [*cmd, "--stop-at-step", "3"], capture_output=True, text=True, timeout=240, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((mon / name).read_text()) for name in ("result.json", "result_rank1.json")]
    # Rank 0 alone sees the file after step 3; one agreement at step 4 stops both there.
    assert [r["global_step"] for r in ranks] == [4, 4]
    assert [r["stop_reason"] for r in ranks] == ["forced", "forced"]  # rank 0's, broadcast
