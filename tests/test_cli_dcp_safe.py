"""A distributed checkpoint's ``.metadata`` is never a way to run code in ``probe``/``watch``.

torch reads ``.metadata`` with a plain ``pickle.load``; the CLI reads it with an
allow-list unless ``--unsafe-load`` is given. A real ``dcp.save`` still reads (see
also ``test_cli_dcp.py``); a planted ``.metadata`` whose pickle would run a command
is refused with one line naming the file and the opt-in, and the command never runs.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import CONTEXT
from test_cli_dcp import FACTORY, probe_args, save_layout
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from lightning_overtrain.cli.dcp_metadata import (
    SafeFileSystemReader,
    UnsafeMetadataError,
    load_metadata,
    metadata_reader,
)
from lightning_overtrain.cli.main import main

BATCH = 4


class _Planted:
    """Unpickles to ``os.system(command)``: what a hostile ``.metadata`` would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def plant(dcp_dir: Path, marker: Path) -> None:
    """Replace ``dcp_dir/.metadata`` by a pickle that writes ``marker`` when loaded."""
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(_Planted(f"echo ran > {marker}")))


@pytest.fixture
def factory(tmp_path: Path) -> str:
    path = tmp_path / "factory.py"
    path.write_text(FACTORY)
    return str(path)


@pytest.fixture
def ref(tmp_path: Path, code_text: bytes) -> Path:
    path = tmp_path / "ref.bin"
    path.write_bytes(code_text[: CONTEXT * BATCH + 1])
    return path


def test_a_real_dcp_save_of_a_model_and_adamw_reads_as_torch_reads_it(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[2].to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the state now holds step tensors and moments
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 3, "tag": "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    safe = SafeFileSystemReader(tmp_path / "ckpt").read_metadata()
    plain = FileSystemReader(tmp_path / "ckpt").read_metadata()
    assert safe.state_dict_metadata == plain.state_dict_metadata
    assert safe.storage_data == plain.storage_data
    assert "optim.state.0.exp_avg" in safe.state_dict_metadata


def test_a_planted_metadata_is_refused_naming_the_file_and_the_opt_in(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "ckpt").mkdir()
    plant(tmp_path / "ckpt", marker)
    with pytest.raises(UnsafeMetadataError) as info:
        load_metadata(str(tmp_path / "ckpt" / ".metadata"))
    text = str(info.value)
    assert "\n" not in text and ".system" in text  # posix.system on POSIX
    assert str(tmp_path / "ckpt" / ".metadata") in text and "--unsafe-load" in text
    assert not marker.exists()
    # The opt-in is torch's own reader, which runs it: why it is an opt-in.
    assert type(metadata_reader(str(tmp_path / "ckpt"), unsafe_load=True)) is FileSystemReader


def _assert_refused(err: str, dcp_dir: Path, marker: Path) -> None:
    assert not marker.exists(), "the planted .metadata ran its command"
    lines = [line for line in err.splitlines() if ".metadata" in line]
    assert lines, err  # watch repeats the line in its closing summary
    for line in lines:
        assert str(dcp_dir / ".metadata") in line and "--unsafe-load" in line


def test_probe_refuses_a_planted_metadata_and_runs_nothing(tmp_path, factory, ref, capsys):
    save_layout(tmp_path / "run", "torchtitan", 2, seed=2)
    bad, _ = save_layout(tmp_path / "run", "torchtitan", 4, seed=4)
    marker = tmp_path / "marker"
    plant(bad, marker)
    args = probe_args(factory, ref, tmp_path / "out", str(tmp_path / "run"))
    assert main([*args, "--module-class", f"{factory}:make"]) == 1
    captured = capsys.readouterr()
    _assert_refused(captured.err, bad, marker)
    assert captured.out.count("probed ") == 1  # the genuine checkpoint is still probed


def test_watch_refuses_a_planted_metadata_and_runs_nothing(tmp_path, factory, ref, capsys):
    save_layout(tmp_path / "run", "torchtitan", 2, seed=2)
    bad, _ = save_layout(tmp_path / "run", "olmo-core", 4, seed=4)
    marker = tmp_path / "marker"
    plant(bad / "model_and_optim", marker)
    args = probe_args(factory, ref, tmp_path / "out", str(tmp_path / "run"))
    args[0:2] = ["watch", str(tmp_path / "run")]
    args += ["--module-class", f"{factory}:make", "--poll", "0.05", "--idle-timeout", "0"]
    args.remove("--no-progress")
    main(args)
    captured = capsys.readouterr()
    _assert_refused(captured.err, bad / "model_and_optim", marker)
    assert captured.out.count("probed ") == 1


def test_a_planted_lightning_meta_pt_is_refused_and_runs_nothing(tmp_path, factory, ref, capsys):
    path, _ = save_layout(tmp_path / "run", "lightning", 2, seed=2)
    marker = tmp_path / "marker"
    torch.save({"global_step": _Planted(f"echo ran > {marker}")}, path / "meta.pt")
    args = probe_args(factory, ref, tmp_path / "out", str(tmp_path / "run"))
    main([*args, "--module-class", "lightning_overtrain.testing.demo:TinyCausalLM"])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "--unsafe-load" in err and str(path) in err
