"""Distributed checkpoints (torch DCP): every engine's layout, read in one process.

The layouts are written here with ``torch.distributed.checkpoint.save`` in each
engine's documented layout (Lightning ``ModelParallelStrategy``: ``state_dict``;
Lightning ``FSDPStrategy(state_dict_type="sharded")``: ``model``; torchtitan: the
model's keys at the top level of ``step-N/``; OLMo-core: ``model``/``optim`` in
``stepN/model_and_optim/``), each with an optimizer state beside the model's
tensors. A real 2-process FSDP2 run of Lightning is in ``test_cli_dcp_fsdp.py``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import CONTEXT, make_module
from torch.distributed.checkpoint import FileSystemReader

from lightning_overtrain import keys
from lightning_overtrain.cli import dcp as dcp_module
from lightning_overtrain.cli.follow import Follower
from lightning_overtrain.cli.loading import load_model
from lightning_overtrain.cli.main import main
from lightning_overtrain.cli.series import DCP, find_checkpoints, is_incomplete, read_metadata
from lightning_overtrain.history import read_history

BATCH = 4
FACTORY = f"""
from lightning_overtrain.testing.demo import TinyCausalLM


def make():
    return TinyCausalLM(n_layer=2, n_embd=32, n_head=2, context={CONTEXT})


def other():
    return TinyCausalLM(n_layer=2, n_embd=16, n_head=2, context={CONTEXT})
"""
LAYOUTS = ("lightning", "lightning-fsdp", "torchtitan", "olmo-core", "dcp")
PREFIXES = {
    "lightning": "state_dict.",
    "lightning-fsdp": "model.",
    "torchtitan": "",
    "olmo-core": "model.",
    "dcp": "net.",
}


def optimizer_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What an Adam state looks like beside the weights: two tensors per parameter."""
    return {f"state.{k}.{m}": torch.full_like(v, 7.0) for k, v in state.items() for m in "ab"}


def save_layout(root: Path, layout: str, step: int, seed: int) -> tuple[Path, dict]:
    """One checkpoint at ``step`` in ``layout``; returns its path and the model's weights."""
    module = make_module(seed)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    optim = optimizer_state(state)
    if layout in ("lightning", "lightning-fsdp"):
        path = root / f"step={step}.ckpt"
        key = "state_dict" if layout == "lightning" else "model"
        dcp.save({key: state, "optimizer_0": optim}, checkpoint_id=path, no_dist=True)
        meta = {"global_step": step, "hyper_parameters": dict(module.hparams), "callbacks": {}}
        torch.save(meta, path / "meta.pt")
    elif layout == "torchtitan":
        path = root / f"step-{step}"
        flat = {**state, "optimizer": optim, "train_state": {"step": torch.tensor(step)}}
        dcp.save(flat, checkpoint_id=path, no_dist=True)
    elif layout == "olmo-core":
        path = root / f"step{step}"
        dcp.save({"model": state, "optim": optim}, checkpoint_id=path / "model_and_optim")
        (path / "train").mkdir()
        torch.save(
            {"global_step": step, "global_train_tokens_seen": step * 1000},
            path / "train" / "rank0.pt",
        )
        (path / ".metadata.json").write_text("{}")
    else:  # a loop of one's own: {"net": ..., "opt": ...}
        path = root / f"ckpt_step{step}"
        dcp.save({"net": state, "opt": optim}, checkpoint_id=path, no_dist=True)
    return path, state


@pytest.fixture
def factory(tmp_path: Path) -> str:
    path = tmp_path / "factory.py"
    path.write_text(FACTORY)
    return str(path)


@pytest.fixture
def read_fqns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every key DCP reads from disk (the storage reader's requests)."""
    seen: list[str] = []
    real = FileSystemReader.read_data

    def read_data(self, plan, planner):
        seen.extend(item.dest_index.fqn for item in plan.items)
        return real(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", read_data)
    return seen


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_engines_layout_is_read_into_the_users_class_without_the_optimizer(
    layout, tmp_path, factory, read_fqns
):
    from lightning_overtrain.cli.loading import import_object

    _, state = save_layout(tmp_path / "run", layout, step=6, seed=3)
    found, failures = find_checkpoints([str(tmp_path / "run")])
    assert failures == [] and [c.kind for c in found] == [DCP]
    (ckpt,) = found
    read_metadata(ckpt)
    assert ckpt.step == 6
    cls = import_object("lightning_overtrain.testing.demo:TinyCausalLM", "--module-class")
    make = cls if layout.startswith("lightning") else import_object(f"{factory}:make", "--x")
    model = load_model(ckpt, make, None, torch.device("cpu"))
    got = model.state_dict()
    assert set(got) == set(state)
    for name, value in state.items():
        assert torch.equal(got[name], value), name
    # Only the model's tensors were read: never the optimizer's, nor other state.
    prefix = PREFIXES[layout]
    assert sorted(read_fqns) == sorted(prefix + k for k in state)


def test_incomplete_checkpoints_are_not_read_until_their_marker_is_there(tmp_path):
    path, _ = save_layout(tmp_path / "run", "lightning", step=2, seed=0)
    meta = (path / "meta.pt").read_bytes()
    (path / "meta.pt").unlink()  # Lightning writes meta.pt after the shards
    (ckpt,), _ = find_checkpoints([str(tmp_path / "run")])
    assert "no meta.pt yet" in (is_incomplete(ckpt) or "")
    follower = Follower(str(tmp_path / "run"))
    assert follower.poll().ready == [] and follower.poll().ready == []
    assert follower.poll().incomplete[0][0] == str(path)
    (path / "meta.pt").write_bytes(meta)
    follower.poll()
    assert [c.path for c, _ in follower.poll().ready] == [str(path)]

    olmo, _ = save_layout(tmp_path / "olmo", "olmo-core", step=2, seed=0)
    (olmo / ".metadata.json").unlink()
    (ckpt,), _ = find_checkpoints([str(olmo)])
    assert ".metadata.json" in (is_incomplete(ckpt) or "")
    titan = tmp_path / "titan" / "step-4"
    save_layout(tmp_path / "titan", "torchtitan", step=4, seed=0)
    (titan / ".metadata").unlink()  # torch writes .metadata last: not a checkpoint yet
    assert find_checkpoints([str(tmp_path / "titan")])[0] == []


def probe_args(factory: str, ref: Path, out: Path, *paths: str) -> list[str]:
    return [
        "probe",
        *paths,
        "--out",
        str(out),
        "--reference-text",
        str(ref),
        "--tokenizer",
        "bytes",
        "--context",
        str(CONTEXT),
        "--batch-size",
        str(BATCH),
        "--reference-batches",
        "1",
        "--gammas",
        "1.0",
        "--pairs",
        "1",
        "--init-std",
        "0.02",
        "--tokens-per-step",
        "1000",
        "--no-progress",
    ]


@pytest.fixture
def ref(tmp_path: Path, code_text: bytes) -> Path:
    path = tmp_path / "ref.bin"
    path.write_bytes(code_text[: CONTEXT * BATCH + 1])
    return path


def test_probe_gives_the_same_numbers_from_dcp_as_from_ckpt_files(tmp_path, factory, ref, capsys):
    """torchtitan step-N/ directories and .ckpt files of the same weights: one history."""
    titan, files = tmp_path / "titan", tmp_path / "files"
    files.mkdir()
    for step, seed in ((2, 1), (4, 2)):
        save_layout(titan, "torchtitan", step, seed)
        module = make_module(seed)
        torch.save(
            {
                "state_dict": module.state_dict(),
                "global_step": step,
                "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0",
            },
            files / f"step={step}.ckpt",
        )
    args = probe_args(factory, ref, tmp_path / "a", str(titan))
    assert main([*args, "--module-class", f"{factory}:make"]) == 0
    out = capsys.readouterr().out
    assert out.count("probed ") == 2  # a line per checkpoint: the output is not a terminal
    args = probe_args(factory, ref, tmp_path / "b", str(files))
    assert main([*args, "--module-class", "lightning_overtrain.testing.demo:TinyCausalLM"]) == 0
    a = read_history(str(tmp_path / "a" / "history.jsonl"))
    b = read_history(str(tmp_path / "b" / "history.jsonl"))
    assert [r[keys.TOKENS] for r in a] == [2000, 4000]
    for ra, rb in zip(a, b):
        for key in (keys.REFERENCE_LOSS, "noise/gamma=1/delta"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-12), key


def test_a_checkpoint_of_another_architecture_is_one_line(tmp_path, factory, ref, capsys):
    for step in (2, 4):
        save_layout(tmp_path / "run", "torchtitan", step, seed=step)
    args = probe_args(factory, ref, tmp_path / "out", str(tmp_path / "run"))
    assert main([*args, "--module-class", f"{factory}:other"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "step-" in line]
    assert len(lines) == 2, err
    for line in lines:
        assert "does not fit TinyCausalLM" in line and "other shapes" in line
        assert "--module-class" in line
    assert "Error(s) in loading state_dict" not in err


def test_a_ckpt_file_of_another_architecture_is_one_line(tmp_path, factory, ref, capsys):
    files = tmp_path / "files"
    files.mkdir()
    module = make_module(0)
    state = {f"renamed.{k}": v for k, v in module.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "global_step": 2,
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": "2.6.0",
        },
        files / "step=2.ckpt",
    )
    args = probe_args(factory, ref, tmp_path / "out", str(files))
    assert main([*args, "--module-class", "lightning_overtrain.testing.demo:TinyCausalLM"]) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "step=2.ckpt" in line]
    assert "does not fit TinyCausalLM" in line and "missing keys" in line
    assert "unexpected keys renamed." in line and "--module-class" in line
    assert "Error(s) in loading state_dict" not in err


def test_a_plain_dcp_needs_its_key_prefix_only_when_it_is_not_obvious(tmp_path, factory, ref):
    path, state = save_layout(tmp_path / "run", "dcp", step=2, seed=5)
    (ckpt,), _ = find_checkpoints([str(path)])
    read_metadata(ckpt)
    from lightning_overtrain.cli.loading import import_object

    make = import_object(f"{factory}:make", "--x")
    model = load_model(ckpt, make, None, torch.device("cpu"))  # "net." found from the keys
    assert torch.equal(model.state_dict()["model.lm_head.weight"], state["model.lm_head.weight"])
    with pytest.raises(Exception, match=r"under the key prefix 'opt\.'"):
        load_model(ckpt, make, None, torch.device("cpu"), dcp_key="opt")


def test_a_checkpoint_deleted_while_it_is_read_is_reported_not_fatal(
    tmp_path, factory, ref, capsys, monkeypatch
):
    import shutil

    for step in (2, 4, 6):
        save_layout(tmp_path / "run", "torchtitan", step, seed=step)
    real = dcp_module.load_dcp_model

    def load(ckpt, *args, **kwargs):
        if ckpt.path.endswith("step-4"):
            shutil.rmtree(ckpt.path)  # keep_latest_k removes it meanwhile
        return real(ckpt, *args, **kwargs)

    monkeypatch.setattr(dcp_module, "load_dcp_model", load)
    args = probe_args(factory, ref, tmp_path / "out", str(tmp_path / "run"))
    assert main([*args, "--module-class", f"{factory}:make"]) == 1
    err = capsys.readouterr().err
    assert "step-4: deleted while it was being read" in err
    assert [r[keys.TOKENS] for r in read_history(str(tmp_path / "out" / "history.jsonl"))] == [
        2000,
        6000,
    ]


def test_threads_default_to_one_on_a_cpu(tmp_path, factory, ref, monkeypatch, capsys):
    save_layout(tmp_path / "run", "torchtitan", 2, seed=1)
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        args = probe_args(factory, ref, tmp_path / "a", str(tmp_path / "run"))
        assert main([*args, "--module-class", f"{factory}:make", "--device", "cpu"]) == 0
        assert torch.get_num_threads() == 1
        assert "threads: 1 (the default on a CPU" in capsys.readouterr().out
        args = probe_args(factory, ref, tmp_path / "b", str(tmp_path / "run"))
        assert main([*args, "--module-class", f"{factory}:make", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_module_class_is_needed_and_named_for_dcp(tmp_path, factory, ref, capsys):
    save_layout(tmp_path / "run", "torchtitan", 2, seed=1)
    assert main(probe_args(factory, ref, tmp_path / "out", str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert "distributed checkpoints hold tensors" in err and "--module-class" in err
    assert os.path.isdir(tmp_path / "run" / "step-2")


def test_watch_probes_complete_dcp_checkpoints_and_reports_an_incomplete_one(
    tmp_path, factory, ref, capsys
):
    for step in (2, 4):
        save_layout(tmp_path / "run", "torchtitan", step, seed=step)
    titan = tmp_path / "run" / "step-6"
    save_layout(tmp_path / "run", "torchtitan", 6, seed=6)
    (titan / ".metadata").unlink()  # torch writes it last: not seen as a checkpoint yet
    lightning, _ = save_layout(tmp_path / "run", "lightning", 8, seed=8)
    (lightning / "meta.pt").unlink()  # Lightning writes it last: seen, waited for
    args = probe_args(factory, ref, tmp_path / "out", str(tmp_path / "run"))
    args[0:2] = ["watch", str(tmp_path / "run")]
    args += ["--module-class", f"{factory}:make", "--poll", "0.05", "--idle-timeout", "0"]
    args.remove("--no-progress")
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out.count("probed ") == 2
    assert f"{lightning}: incomplete: no meta.pt yet" in captured.err
    history = read_history(str(tmp_path / "out" / "history.jsonl"))
    assert [r[keys.TOKENS] for r in history] == [2000, 4000]


def test_watch_reports_a_checkpoint_deleted_while_it_is_read(
    tmp_path, factory, ref, capsys, monkeypatch
):
    import shutil

    for step in (2, 4):
        save_layout(tmp_path / "run", "torchtitan", step, seed=step)
    real = dcp_module.load_dcp_model

    def load(ckpt, *args, **kwargs):
        if ckpt.path.endswith("step-4"):
            shutil.rmtree(ckpt.path)  # keep_latest_k removes it meanwhile
        return real(ckpt, *args, **kwargs)

    monkeypatch.setattr(dcp_module, "load_dcp_model", load)
    args = probe_args(factory, ref, tmp_path / "out", str(tmp_path / "run"))
    args[0:2] = ["watch", str(tmp_path / "run")]
    args += ["--module-class", f"{factory}:make", "--poll", "0.05", "--idle-timeout", "0"]
    args.remove("--no-progress")
    assert main(args) == 0  # reported, not a failure: the run's retention policy did it
    out = capsys.readouterr().out
    assert "step-4 was deleted while it was being read" in out
    history = read_history(str(tmp_path / "out" / "history.jsonl"))
    assert [r[keys.TOKENS] for r in history] == [2000]
