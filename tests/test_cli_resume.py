"""A re-run into the same ``probe --out`` resumes the same run and refuses to mix in another."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from cli_models import TEXT, forget_module, probe_args, write_checkpoints, write_model
from conftest import history_text

from lightning_overtrain import read_history
from lightning_overtrain.cli import probe as probe_module
from lightning_overtrain.cli.main import main
from lightning_overtrain.engine.data import fingerprint_batches

MODULE = "mygpt_resume"


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Probe arguments for a plain-torch series of 3 checkpoints, and a measurement counter."""
    write_model(tmp_path, MODULE)
    ckpts = write_checkpoints(tmp_path)
    reference = tmp_path / "reference.txt"
    reference.write_bytes(TEXT)
    monkeypatch.setattr(sys, "path", [*sys.path])
    monkeypatch.chdir(tmp_path)
    calls: list[int] = []
    real = probe_module.measure_snapshot
    monkeypatch.setattr(probe_module, "measure_snapshot", lambda *a: calls.append(1) or real(*a))
    model = ["--module-class", f"{MODULE}:MyGPT", "--loss-fn", f"{MODULE}:loss_fn"]
    out = tmp_path / "out"
    yield {
        "args": lambda *extra, ref=reference: [*probe_args(ckpts, out, ref, *extra), *model],
        "out": out,
        "dir": tmp_path,
        "calls": calls,
        "real": real,
    }
    forget_module(MODULE)


def history(out: Path) -> list[dict]:
    return read_history(str(out / "history.jsonl"))


@pytest.mark.parametrize("probed_before", [0, 1])
def test_an_interrupted_first_run_refuses_other_settings(run, monkeypatch, capsys, probed_before):
    def interrupt(*args):
        if len(run["calls"]) == probed_before:
            raise KeyboardInterrupt  # Ctrl-C while the next checkpoint is measured
        run["calls"].append(1)
        return run["real"](*args)

    monkeypatch.setattr(probe_module, "measure_snapshot", interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(run["args"]())
    out = run["out"]
    assert json.loads((out / "monitor.json").read_text())["probes"]["noise"]["gammas"] == [0.5, 1]
    assert (
        len(history(out)) == probed_before
        if probed_before
        else not (out / "history.jsonl").exists()
    )

    capsys.readouterr()
    assert main(run["args"]("--gammas", "0.25")) == 2
    err = capsys.readouterr().err
    assert "--gammas" in err and "probes.noise.gammas was [0.5, 1.0], now [0.25]" in err
    if not probed_before:
        assert "holds no results yet: delete" in err

    monkeypatch.setattr(probe_module, "measure_snapshot", run["real"])
    assert main(run["args"]()) == 0  # the same settings resume
    assert [r["tokens"] for r in history(out)] == [1000, 2000, 3000]


def test_a_reference_set_of_the_same_size_but_other_text_is_refused(run, capsys):
    assert main(run["args"]()) == 0
    first = history(run["out"])
    other = run["dir"] / "other.txt"
    other.write_bytes(TEXT[::-1])  # the same tokens, so the same count, in another order
    capsys.readouterr()
    assert main(run["args"](ref=other)) == 2
    err = capsys.readouterr().err
    assert "the reference set's content" in err and "reference_fingerprint was 'sha256:" in err
    assert "reference set's size" not in err  # the count is the same: only the content differs
    assert history_text(history(run["out"])) == history_text(first)

    # The same data resumes: all three are done already, nothing is measured again.
    del run["calls"][:]
    assert main(run["args"]()) == 0
    assert run["calls"] == []
    assert history_text(history(run["out"]), skip=()) == history_text(first, skip=())


def test_other_downstream_data_is_refused(run, capsys):
    prose = run["dir"] / "prose.txt"
    prose.write_bytes(TEXT * 2)
    finetune = ["--finetune-steps", "1", "--finetune-lrs", "1e-3", "--downstream-text"]
    assert main(run["args"](*finetune, str(prose))) == 0
    prose.write_bytes(bytes(reversed(TEXT * 2)))
    capsys.readouterr()
    assert main(run["args"](*finetune, str(prose))) == 2
    err = capsys.readouterr().err
    assert "the downstream data (--downstream-text): downstream_fingerprint was" in err
    assert "reference set" not in err


def test_fingerprints_follow_content_and_order_not_key_order():
    a, b = torch.arange(64).view(4, 16), torch.arange(64).flip(0).view(4, 16)
    same = fingerprint_batches([{"input_ids": a}, {"input_ids": b}])
    assert fingerprint_batches([{"input_ids": a.clone()}, {"input_ids": b.clone()}]) == same
    assert fingerprint_batches([{"input_ids": b}, {"input_ids": a}]) != same  # order
    assert fingerprint_batches([{"input_ids": a}, {"input_ids": b + 1}]) != same  # content
    assert fingerprint_batches([{"input_ids": a}, {"input_ids": b.int()}]) != same  # dtype
    mask = torch.ones(4, 16, dtype=torch.long)
    assert fingerprint_batches([{"input_ids": a, "attention_mask": mask}]) == fingerprint_batches(
        [{"attention_mask": mask, "input_ids": a}]
    )
    assert fingerprint_batches([(a, b)]) != fingerprint_batches([(b, a)])
