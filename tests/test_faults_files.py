"""Files read from disk are data, not commands; files written never follow a planted link.

Anything that could block (a FIFO, /dev/zero) runs in a subprocess under
``timeout -s KILL``, so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import make_module, make_trainer, train_loader
from lightning.pytorch.callbacks import Callback

from lightning_overtrain.callbacks.remote import STOP_FILE, WatcherStop, read_stop
from lightning_overtrain.cli.main import main
from lightning_overtrain.history import read_history, read_history_checked, write_history
from lightning_overtrain.safe_io import UnsafeFile, read_regular, write_json_atomic

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def run_isolated(code: str, seconds: int = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python under ``timeout -s KILL``: a hang is a failure (137)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{HERE}", "OMP_NUM_THREADS": "1"}
    command = ["timeout", "-s", "KILL", str(seconds), sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(command, capture_output=True, text=True, env=env)


# ---------------------------------------------------------------------- the stop file
WATCHER_DECISION = {"reason": "the noise signal turned", "level": "stop", "signal": "noise"}


@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "not complete JSON"),
        (b"garbage {", "not complete JSON"),
        (b'["stop"]', "JSON list, not an object"),
        (b'{"stop": true}', 'no "reason" string'),
        (b'{"reason": "x", "level": "warn"}', "\"level\" is 'warn'"),
    ],
)
def test_a_stop_file_without_the_watchers_schema_is_not_a_decision(tmp_path, content, why):
    path = tmp_path / STOP_FILE
    path.write_bytes(content)
    with pytest.raises(ValueError, match=why):
        read_stop(str(path))


def test_the_watchers_own_decision_is_read_and_a_long_reason_is_cut(tmp_path):
    path = tmp_path / STOP_FILE
    write_json_atomic(str(path), WATCHER_DECISION)
    assert read_stop(str(path)) == "the noise signal turned"
    write_json_atomic(str(path), {"reason": "x" * 10_000})
    assert len(read_stop(str(path))) < 2100


def test_a_300_mb_stop_file_is_refused_by_its_size_without_reading_it(tmp_path):
    path = tmp_path / STOP_FILE
    with open(path, "wb") as f:  # sparse: 300 MB on paper, nothing on disk
        f.truncate(300 * 2**20)
    with pytest.raises(ValueError, match="314,572,800 bytes, more than the 65,536 read"):
        read_stop(str(path))


def test_a_symlinked_stop_file_is_refused_even_to_a_valid_decision(tmp_path):
    target = tmp_path / "elsewhere.json"
    write_json_atomic(str(target), WATCHER_DECISION)
    os.symlink(target, tmp_path / STOP_FILE)
    with pytest.raises(ValueError, match="symlink"):
        read_stop(str(tmp_path / STOP_FILE))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_fifo_or_dev_zero_at_the_stop_file_is_ignored_with_one_warning_and_training_goes_on(
    tmp_path, kind
):
    code = f"""
    import os, warnings
    from conftest import make_module, make_trainer, train_loader
    from lightning_overtrain.callbacks.remote import STOP_FILE, WatcherStop
    from lightning_overtrain.testing.demo import stdlib_code
    from lightning.pytorch.callbacks import Callback

    d = {str(tmp_path)!r}
    class Plant(Callback):  # after the run started: not a stale file, a new "decision"
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                path = os.path.join(d, STOP_FILE)
                os.mkfifo(path) if {kind!r} == "fifo" else os.symlink("/dev/zero", path)
    stop = WatcherStop(d, min_interval_s=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(d, [stop, Plant()], max_steps=6)
        trainer.fit(make_module(), train_loader(stdlib_code(max_bytes=200_000)))
    said = [str(w.message) for w in caught if "WatcherStop: ignoring" in str(w.message)]
    print("STEPS", trainer.global_step, "REASON", stop.stop_reason, "WARNINGS", len(said))
    print(said[0])
    """
    proc = run_isolated(code, seconds=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STEPS 6 REASON None WARNINGS 1" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    why = "not a regular file (a FIFO)" if kind == "fifo" else "symlink"
    assert why in proc.stdout and STOP_FILE in proc.stdout


def test_garbage_in_the_stop_file_does_not_stop_training_but_a_real_decision_then_does(
    tmp_path, code_text
):
    class Writes(Callback):
        def on_train_batch_end(self, trainer, *args):
            path = tmp_path / STOP_FILE
            if trainer.global_step == 2:
                path.write_text("")  # empty: garbage
            if trainer.global_step == 4:
                write_json_atomic(str(path), WATCHER_DECISION)

    stop = WatcherStop(tmp_path, min_interval_s=0)
    with pytest.warns(UserWarning, match="WatcherStop: ignoring .*overtrain_stop.json: it is not"):
        make_trainer(tmp_path, [stop, Writes()], max_steps=10).fit(
            make_module(), train_loader(code_text)
        )
    assert stop.stop_reason == "the noise signal turned"


@pytest.mark.parametrize("interval", [float("inf"), float("nan"), 10**9])
def test_watcher_stop_refuses_an_interval_that_would_never_look(tmp_path, interval):
    with pytest.raises(ValueError, match=r"`min_interval_s` must be a finite number .* got"):
        WatcherStop(tmp_path, min_interval_s=interval)


# ---------------------------------------------------------------------- writers
def test_writers_replace_a_planted_symlink_and_never_write_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("history.jsonl", "history.csv", "monitor.json"):
        os.symlink(outside, run / name)
    # The old fixed temporary names, planted too.
    for name in ("history.jsonl.tmp", "history.csv.tmp", f"monitor.json.{os.getpid()}.tmp"):
        os.symlink(outside, run / name)
    write_history([{"tokens": 1.0, "reference_loss": 2.0}], str(run))
    write_json_atomic(str(run / "monitor.json"), {"a": 1})
    assert outside.read_text() == "precious"
    assert not (run / "history.jsonl").is_symlink()
    assert read_history(str(run / "history.jsonl")) == [{"tokens": 1.0, "reference_loss": 2.0}]


def test_two_writers_of_one_history_never_tear_it_or_fail(tmp_path):
    errors: list[BaseException] = []
    records = [{"tokens": float(i), "reference_loss": 1.0 / (i + 1)} for i in range(200)]

    def write(offset: int) -> None:
        try:
            for n in range(1, 60):
                write_history(records[: n + offset], str(tmp_path))
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        for _ in range(200):
            _, problem = read_history_checked(str(tmp_path / "history.jsonl"))
            if problem is not None:
                errors.append(AssertionError(problem))

    write_history(records[:1], str(tmp_path))
    threads = [threading.Thread(target=write, args=(k,)) for k in (0, 100)]
    threads.append(threading.Thread(target=read))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


# ---------------------------------------------------------------------- readers
def test_a_truncated_history_is_one_line_naming_the_file_and_every_complete_record_loads(
    tmp_path,
):
    records = [{"tokens": float(i), "reference_loss": 3.0 - i / 10} for i in range(5)]
    jsonl, _ = write_history(records, str(tmp_path))
    with open(jsonl) as f:
        text = f.read()
    with open(jsonl, "w") as f:
        f.write(text[: len(text) - 10])  # the last record cut mid-way
    history, problem = read_history_checked(jsonl)
    assert history == records[:4]
    assert problem == (
        f"{jsonl}: line 5 is not a complete JSON record (truncated or corrupt); skipped,"
        " 4 complete record(s) loaded."
    )
    with pytest.warns(UserWarning, match="line 5 is not a complete JSON record"):
        assert read_history(jsonl) == records[:4]


def test_readers_never_open_a_fifo_or_a_device_for_reading(tmp_path):
    os.mkfifo(tmp_path / "history.jsonl")
    code = f"""
    from lightning_overtrain.safe_io import UnsafeFile, read_regular
    for path in ({str(tmp_path / "history.jsonl")!r}, "/dev/zero"):
        try:
            read_regular(path, 1 << 30)
        except UnsafeFile as exc:
            print("refused:", exc)
    """
    proc = run_isolated(code)
    assert proc.returncode == 0, proc.stderr
    assert "refused: it is not a regular file (a FIFO)" in proc.stdout
    assert "refused: it is not a regular file (a character device)" in proc.stdout
    with pytest.raises(UnsafeFile, match="more than the 10 read"):
        (tmp_path / "big").write_text("x" * 11)
        read_regular(str(tmp_path / "big"), 10)


# ---------------------------------------------------------------------- report
def make_run(tmp_path, figure: str) -> str:
    run = tmp_path / "handed_over" / "run"
    records = [
        {"tokens": float(t), "step": float(i), "reference_loss": 3.0 - i / 10, "mine/x": 1.0 + i}
        for i, t in enumerate((1e6, 2e6, 4e6, 8e6))
    ]
    write_history(records, str(run))
    signal = {"key": "mine/x", "figure": figure, "label": "x"}
    settings = {"signals": [{"key": "reference_loss"}, signal]}
    (run / "monitor.json").write_text(json.dumps(settings))
    return str(run)


@pytest.mark.parametrize("figure", ["/tmp/overtrain_evil", "../../evil"])
def test_report_writes_only_inside_its_run_directory_whatever_monitor_json_says(
    tmp_path, capsys, figure
):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path, figure)
    before = set(os.listdir(tmp_path))
    assert main(["report", run]) == 0
    out = capsys.readouterr().out
    assert "is not a plain file name" in out
    assert set(os.listdir(tmp_path)) == before  # nothing beside the run
    assert not os.path.exists(figure + ".png")
    plots = os.listdir(os.path.join(run, "plots"))
    assert plots and all("/" not in p and ".." not in p for p in plots)


def test_report_on_a_truncated_history_and_corrupt_settings_says_so_in_one_line_each(
    tmp_path, capsys
):
    run = make_run(tmp_path, "mine")
    jsonl = os.path.join(run, "history.jsonl")
    with open(jsonl) as f:
        text = f.read()
    with open(jsonl, "w") as f:
        f.write(text[:-7])
    with open(os.path.join(run, "monitor.json"), "w") as f:
        f.write('{"signals": [')
    assert main(["report", run]) == 0
    out = capsys.readouterr().out
    assert f"{jsonl}: line 4 is not a complete JSON record" in out
    assert "3 complete record(s) loaded" in out
    assert "monitor.json: not read (it is not complete JSON" in out
    assert "JSONDecodeError" not in out


def test_report_writes_nothing_through_links_leading_out_of_the_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path, "mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(run, "plots"))
    precious = tmp_path / "precious.md"
    precious.write_text("keep")
    os.symlink(precious, os.path.join(run, "summary.md"))  # replaced, never written through
    assert main(["report", run]) == 0
    assert "leads outside" in capsys.readouterr().out
    assert os.listdir(outside) == [] and precious.read_text() == "keep"
    assert not os.path.islink(os.path.join(run, "summary.md"))
