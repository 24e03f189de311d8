"""``lightning-overtrain probe`` with a plain-torch model of the user's own, run beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_models import TEXT, forget_module, probe_args, write_checkpoints, write_model

from lightning_overtrain import read_history
from lightning_overtrain.cli import probe as probe_module
from lightning_overtrain.cli.main import main


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """A user's directory: ``<name>.py`` (a unique module name per test), checkpoints, text."""
    name = "mygpt_" + request.node.name.split("[")[0].removeprefix("test_")[:40]
    write_model(tmp_path, name)
    ckpts = write_checkpoints(tmp_path)
    reference = tmp_path / "reference.txt"
    reference.write_bytes(TEXT)
    monkeypatch.setattr(sys, "path", [*sys.path])  # the CLI puts the cwd on it
    monkeypatch.chdir(tmp_path)
    yield {"name": name, "dir": tmp_path, "ckpts": ckpts, "reference": reference}
    forget_module(name)


def test_module_class_resolves_from_the_current_directory(project, capsys):
    name, out = project["name"], project["dir"] / "out"
    args = probe_args(project["ckpts"], out, project["reference"])
    code = main([*args, "--module-class", f"{name}:MyGPT", "--loss-fn", f"{name}:loss_fn"])
    assert code == 0, capsys.readouterr().err
    assert [r["tokens"] for r in read_history(str(out / "history.jsonl"))] == [1000, 2000, 3000]


def test_a_module_not_found_suggests_its_file_path(project, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    name = project["name"]
    args = probe_args(project["ckpts"], project["dir"] / "out", project["reference"])
    assert main([*args, "--module-class", f"{name}:MyGPT"]) == 2
    err = capsys.readouterr().err
    assert f"No module named '{name}'" in err
    assert f"--module-class path/to/{name}.py:MyGPT" in err
    assert not (project["dir"] / "out").exists()


def test_the_default_loss_on_a_plain_model_stops_at_the_first_checkpoint(
    project, monkeypatch, capsys
):
    calls = []
    real = probe_module.measure_snapshot
    monkeypatch.setattr(probe_module, "measure_snapshot", lambda *a: calls.append(1) or real(*a))
    name, out = project["name"], project["dir"] / "out"
    args = [*probe_args(project["ckpts"], out, project["reference"]), "--module-class"]
    assert main([*args, f"{name}:MyGPT"]) == 2
    err = capsys.readouterr().err
    assert "the default loss, model(**batch).loss" in err
    assert "--loss-fn path/to/file.py:loss_fn" in err
    assert "{'input_ids': int64[4, 16]}" in err and "step=1.ckpt" in err
    assert "checkpoint(s) failed" not in err
    assert calls == [] and not (out / "history.jsonl").exists()
    # Nothing was measured, so nothing is settled: the fixed command is not refused.
    assert not (out / "monitor.json").exists()
    assert main([*args, f"{name}:MyGPT", "--loss-fn", f"{name}:loss_fn"]) == 0
    assert len(calls) == 3


def test_a_failing_loss_of_the_users_is_named(project, capsys):
    name = project["name"]
    args = probe_args(project["ckpts"], project["dir"] / "out", project["reference"])
    assert main([*args, "--module-class", f"{name}:MyGPT", "--loss-fn", f"{name}:broken_loss"]) == 2
    err = capsys.readouterr().err
    assert f"--loss-fn '{name}:broken_loss' does not work on the first reference batch" in err
    assert "default loss" not in err


def test_when_no_checkpoint_could_be_probed_the_message_says_so(tmp_path, capsys):
    for name in ("a.ckpt", "b.ckpt"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
    reference = tmp_path / "reference.txt"
    reference.write_bytes(TEXT)
    out = tmp_path / "out"
    assert main(probe_args(tmp_path, out, reference)) == 1
    err = capsys.readouterr().err
    assert "2 checkpoint(s) failed (none was probed)" in err
    assert not out.exists()  # nothing measured: a re-run with other settings is not refused


def test_help_says_which_batches_reference_text_builds(capsys):
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "{'input_ids': LongTensor[--batch-size, --context]}" in out
    assert "as `python -m` would" in out


@pytest.mark.slow
def test_the_console_script_imports_the_model_beside_it(tmp_path):
    installed = Path(sys.executable).with_name("lightning-overtrain")
    if not installed.exists():
        pytest.skip("the console script is not installed in this environment")
    write_model(tmp_path, "mygpt")
    ckpts = write_checkpoints(tmp_path, steps=(1,))
    (tmp_path / "reference.txt").write_bytes(TEXT)
    args = probe_args(ckpts.relative_to(tmp_path), Path("out"), Path("reference.txt"))
    result = subprocess.run(
        [str(installed), *args, "--module-class", "mygpt:MyGPT", "--loss-fn", "mygpt:loss_fn"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "history.jsonl").is_file()


def test_a_checkpoint_of_another_run_is_skipped_and_named_unless_asked(project, capsys):
    """Another run's checkpoint (same architecture) handed in with a series is not mixed in."""
    name, out = project["name"], project["dir"] / "out"
    (project["dir"] / "other").mkdir()
    other = write_checkpoints(project["dir"] / "other", steps=(5,))
    args = probe_args(project["ckpts"], out, project["reference"])
    args.insert(2, str(other / "step=5.ckpt"))
    args += ["--module-class", f"{name}:MyGPT", "--loss-fn", f"{name}:loss_fn"]
    assert main(args) == 1
    captured = capsys.readouterr()
    line = next(x for x in captured.out.splitlines() if x.startswith("skipping"))
    assert str(other / "step=5.ckpt") in line and "another run" in line
    assert str(other) in line and str(project["ckpts"]) in line and "--mix-runs" in line
    assert [r["tokens"] for r in read_history(str(out / "history.jsonl"))] == [1000, 2000, 3000]
    mixed = project["dir"] / "mixed"
    assert main([*args[:4], str(mixed), *args[5:], "--mix-runs"]) == 0
    assert len(read_history(str(mixed / "history.jsonl"))) == 4
