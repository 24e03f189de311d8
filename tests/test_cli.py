"""``lightning-overtrain probe`` and ``report`` on a small series made here, in both formats.

One tiny run with the live monitor writes Lightning ``.ckpt`` files and
``save_pretrained`` directories at the monitor's own snapshots; the CLI must find
the same numbers on them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import (
    CONTEXT,
    history_text,
    make_module,
    make_trainer,
    reference_batches,
    train_loader,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_overtrain import FineTuneProbe, NoiseProbe, OvertrainingMonitor, keys, read_history
from lightning_overtrain.cli import probe as probe_module
from lightning_overtrain.cli import report as report_module
from lightning_overtrain.cli.main import main
from lightning_overtrain.cli.text import split_text
from lightning_overtrain.inflection.policy import InflectionPolicy
from lightning_overtrain.testing.demo import ByteWindows

EVERY = 4
STEPS = 12
BATCH = 8
GAMMAS = ("0.5", "1.0")
PAIRS = 2
FINETUNE_STEPS = 2
MODULE_CLASS = "lightning_overtrain.testing.demo:TinyCausalLM"


class SavePretrained(pl.Callback):
    """``module.model.save_pretrained`` at step 0 and at every monitor snapshot."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _save(self, module: pl.LightningModule, step: int) -> None:
        module.model.save_pretrained(self.root / f"step-{step:04d}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % EVERY == 0:
            self._save(pl_module, trainer.global_step)


@pytest.fixture(scope="module")
def series(
    tmp_path_factory: pytest.TempPathFactory, code_text: bytes, prose_text: bytes
) -> dict[str, Any]:
    """A live run: its monitor history, its .ckpt files, its save_pretrained dirs."""
    root = tmp_path_factory.mktemp("series")
    ref = reference_batches(code_text, n=2, batch_size=BATCH)
    ref_file = root / "reference.bin"
    ref_file.write_bytes(code_text[-CONTEXT * BATCH * 2 :])  # the same bytes as `ref`
    prose_file = root / "prose.txt"
    prose_file.write_bytes(prose_text[:20_000])
    # What `--downstream-text prose.txt` builds: the last 10% held out, the same windows.
    prose_train, prose_eval = split_text(prose_text[:20_000], held_out=0.1)
    finetune = FineTuneProbe(
        list(DataLoader(ByteWindows(prose_train, CONTEXT), batch_size=BATCH)),
        list(DataLoader(ByteWindows(prose_eval, CONTEXT), batch_size=BATCH)),
        steps=FINETUNE_STEPS,
        lrs=(1e-3,),
    )
    monitor = OvertrainingMonitor(
        ref,
        every_n_steps=EVERY,
        probes=[NoiseProbe(gammas=tuple(float(g) for g in GAMMAS), pairs=PAIRS), finetune],
        dirpath=root / "monitor",
    )
    ckpts = ModelCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=EVERY, save_top_k=-1, filename="{step}"
    )
    trainer = make_trainer(
        root,
        [monitor, ckpts, SavePretrained(root / "hf")],
        max_steps=STEPS,
        enable_checkpointing=True,
    )
    trainer.fit(make_module(), train_loader(code_text, batch_size=BATCH))
    return {
        "root": root,
        "history": monitor.history,
        "monitor_dir": str(root / "monitor"),
        "ckpt_dir": str(root / "ckpt"),
        "hf_dir": str(root / "hf"),
        "ref_file": str(ref_file),
        "prose_file": str(prose_file),
    }


def probe_args(series: dict[str, Any], out: Path, *checkpoints: str) -> list[str]:
    return [
        "probe",
        *checkpoints,
        "--out",
        str(out),
        "--reference-text",
        series["ref_file"],
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
        "--downstream-text",
        series["prose_file"],
        "--finetune-steps",
        str(FINETUNE_STEPS),
        "--finetune-lrs",
        "1e-3",
        "--no-progress",
    ]


def assert_same_numbers(cli_history: list[dict], live_history: list[dict]) -> None:
    live = {r[keys.TOKENS]: r for r in live_history}
    assert [r[keys.TOKENS] for r in cli_history] == sorted(live)
    for record in cli_history:
        expected = live[record[keys.TOKENS]]
        assert record[keys.STEP] == expected[keys.STEP]
        names = [k for k in expected if "/" in k or k == keys.REFERENCE_LOSS]
        assert "finetune/lr=0.001/forgetting" in names and "best/tokens" in names
        assert "inflection/noise/gamma=1/perturbed_loss/bottom_tokens" in names
        for key in names:
            got, want = record[key], expected[key]
            if isinstance(want, list):  # a probe's per-sample values
                assert got == pytest.approx(want, rel=1e-9, abs=1e-12), key
                continue
            # NaN: the detector's "not yet" (no forecast), the same in both.
            same = math.isnan(got) and math.isnan(want)
            assert same or math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), key


def test_lightning_checkpoints_give_the_live_monitors_numbers(series, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([*probe_args(series, out, series["ckpt_dir"]), "--module-class", MODULE_CLASS])
    assert code == 0
    assert_same_numbers(read_history(str(out / "history.jsonl")), series["history"])
    settings = json.loads((out / "monitor.json").read_text())
    assert "monitor's state" in settings["init_std_source"]
    assert {c["tokens_from"] for c in settings["checkpoints"]} == {"the monitor's tokens"}
    best = int(series["history"][-1]["best/tokens"])
    (path,) = [c["path"] for c in settings["checkpoints"] if c["tokens"] == best]
    assert f"(to fine-tune): {path}" in capsys.readouterr().out
    # The live run and the CLI fingerprint the same reference set alike.
    live = json.loads(Path(series["monitor_dir"], "monitor.json").read_text())
    assert settings["reference_fingerprint"] == live["reference_fingerprint"]
    assert settings["reference_fingerprint"].startswith("sha256:")


def test_save_pretrained_dirs_give_the_live_monitors_numbers(series, tmp_path, capsys):
    out = tmp_path / "out"
    args = probe_args(series, out, series["hf_dir"])
    args += ["--tokens-pattern", r"step-(?P<step>\d+)", "--tokens-per-step", str(BATCH * CONTEXT)]
    assert main(args) == 0
    assert_same_numbers(read_history(str(out / "history.jsonl")), series["history"])
    assert "init std from the weights of the step-0 checkpoint" in capsys.readouterr().out


def test_the_kept_best_snapshot_is_probed_at_its_own_tokens(series, tmp_path):
    best = os.path.join(series["monitor_dir"], "best.ckpt")
    out = tmp_path / "out"
    assert main([*probe_args(series, out, best), "--module-class", MODULE_CLASS]) == 0
    (record,) = read_history(str(out / "history.jsonl"))
    tokens = series["history"][-1]["best/tokens"]
    assert record[keys.TOKENS] == tokens
    (live,) = [r for r in series["history"] if r[keys.TOKENS] == tokens]
    for key in ("reference_loss", "noise/gamma=1/delta", "finetune/lr=0.001/forgetting"):
        assert math.isclose(record[key], live[key], rel_tol=1e-9), key


def test_rerun_skips_checkpoints_already_probed(series, tmp_path, monkeypatch):
    out = tmp_path / "out"
    hf = sorted(Path(series["hf_dir"]).iterdir())
    tokens = ["--tokens-pattern", r"step-(?P<step>\d+)", "--tokens-per-step", str(BATCH * CONTEXT)]
    assert main([*probe_args(series, out, *map(str, hf[:3])), *tokens]) == 0
    first = read_history(str(out / "history.jsonl"))
    assert len(first) == 2  # step 0 gives the init std only

    calls = []
    real = probe_module.measure_snapshot
    monkeypatch.setattr(probe_module, "measure_snapshot", lambda *a: calls.append(1) or real(*a))
    assert main([*probe_args(series, out, series["hf_dir"]), *tokens]) == 0
    second = read_history(str(out / "history.jsonl"))
    assert len(calls) == 1 and len(second) == 3
    # The earlier records are kept, not measured again (their probe_seconds too).
    assert history_text(second[:2], skip=()) == history_text(first, skip=())


def test_rerun_with_other_settings_is_refused(series, tmp_path, capsys):
    out = tmp_path / "out"
    args = [*probe_args(series, out, series["ckpt_dir"]), "--module-class", MODULE_CLASS]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--pairs", "3"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--out" in err


def test_missing_and_unreadable_checkpoints_are_listed_and_the_rest_probed(
    series, tmp_path, capsys
):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    good = sorted(Path(series["ckpt_dir"]).glob("*.ckpt"))[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    args = probe_args(series, out, str(good), str(broken), str(empty))
    assert main([*args, "--module-class", MODULE_CLASS]) == 1
    err = capsys.readouterr().err
    assert "2 checkpoint(s) failed" in err
    assert f"{empty}: no .ckpt file" in err and f"{broken}: unreadable" in err
    assert len(read_history(str(out / "history.jsonl"))) == 1


def test_a_missing_path_is_one_line_and_exit_2(series, tmp_path, capsys):
    good = sorted(Path(series["ckpt_dir"]).glob("*.ckpt"))[0]
    missing = str(tmp_path / "nope.ckpt")
    args = probe_args(series, tmp_path / "out", str(good), missing)
    assert main([*args, "--module-class", MODULE_CLASS]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"lightning-overtrain probe: error: CHECKPOINT {missing!r}: no such file or directory."
    ]
    assert not (tmp_path / "out").exists()


def test_a_first_checkpoint_that_does_not_load_leaves_the_rest_probed_alike(
    series, tmp_path, capsys
):
    good = sorted(Path(series["ckpt_dir"]).glob("*.ckpt"))[0]
    data = torch.load(good, weights_only=False)
    data["state_dict"] = {"not.a.parameter": torch.zeros(1)}
    data["callbacks"][next(iter(data["callbacks"]))]["tokens"] = 1  # sorts first
    early = tmp_path / "early.ckpt"
    torch.save(data, early)
    out = tmp_path / "out"
    args = probe_args(series, out, str(early), series["ckpt_dir"])
    assert main([*args, "--module-class", MODULE_CLASS]) == 1
    err = capsys.readouterr().err
    assert f"{early}: it does not fit TinyCausalLM (missing keys model." in err
    assert "unexpected keys not.a.parameter)" in err and "--module-class" in err
    assert_same_numbers(read_history(str(out / "history.jsonl")), series["history"])


def test_a_bad_tokens_map_is_a_clear_error(series, tmp_path, capsys):
    mapping = tmp_path / "tokens.json"
    mapping.write_text(json.dumps({"step-0004": "lots"}))
    args = [*probe_args(series, tmp_path / "out", series["hf_dir"]), "--tokens-map", str(mapping)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--tokens-map" in err and "'step-0004'" in err and "'lots'" in err
    assert not (tmp_path / "out").exists()


def test_checkpoints_missing_from_the_tokens_map_are_listed(series, tmp_path, capsys):
    mapping = tmp_path / "tokens.csv"
    mapping.write_text("checkpoint,tokens\nhf/step-0004,1024\nstep-0008,2048\n")
    out = tmp_path / "out"
    args = [*probe_args(series, out, series["hf_dir"]), "--tokens-map", str(mapping)]
    (tmp_path / "hf").symlink_to(series["hf_dir"])  # the map names paths relative to itself
    args[1] = str(tmp_path / "hf")
    assert main([*args, "--init-std", "0.02"]) == 1
    err = capsys.readouterr().err
    assert "step-0012: not in --tokens-map" in err
    assert [r[keys.TOKENS] for r in read_history(str(out / "history.jsonl"))] == [1024, 2048]


def test_lightning_checkpoints_without_the_module_class_are_a_clear_error(series, tmp_path, capsys):
    assert main(probe_args(series, tmp_path / "out", series["ckpt_dir"])) == 2
    assert "--module-class" in capsys.readouterr().err


def test_reference_batches_from_a_python_file(series, tmp_path):
    source = tmp_path / "data.py"
    source.write_text(
        "import torch\n"
        f"DATA = open({series['ref_file']!r}, 'rb').read()\n"
        "def batches():\n"
        "    ids = torch.frombuffer(bytearray(DATA), dtype=torch.uint8).long()\n"
        f"    ids = ids.view(-1, {CONTEXT})\n"
        f"    return [{{'input_ids': b}} for b in ids.split({BATCH})]\n"
    )
    out = tmp_path / "out"
    args = probe_args(series, out, series["ckpt_dir"])
    at = args.index("--reference-text")
    args[at : at + 2] = ["--reference-fn", f"{source}:batches"]
    assert main([*args, "--module-class", MODULE_CLASS]) == 0
    assert_same_numbers(read_history(str(out / "history.jsonl")), series["history"])


def test_report_renders_a_live_monitors_run(series, capsys):
    assert main(["report", str(series["root"])]) == 0  # finds monitor/history.jsonl below
    out = capsys.readouterr().out
    summary = Path(series["monitor_dir"], "summary.md").read_text()
    assert summary.strip() in out
    table = [line for line in summary.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(series["history"])
    header = [cell.strip() for cell in table[0].strip("| ").split("|")]
    assert header == [
        "tokens",
        "step",
        "reference_loss",
        "noise/gamma=0.5/perturbed_loss",
        "noise/gamma=0.5/delta",
        "noise/gamma=1/perturbed_loss",
        "noise/gamma=1/delta",
        "finetune/lr=0.001/forgetting",
    ]
    inflection = json.loads(Path(series["monitor_dir"], "inflection.json").read_text())
    assert set(inflection) == {
        *(f"noise/gamma={g:g}/perturbed_loss" for g in (0.5, 1.0)),
        "finetune/lr=0.001/reference_loss_after",
        "finetune/lr=0.001/downstream_loss_after",
    }
    assert all(v["n_points"] == len(series["history"]) for v in inflection.values())
    # The figures go where the live run's PlotReporter put them, not beside the history.
    pytest.importorskip("matplotlib")
    assert f"plot: {Path(series['monitor_dir'], 'plots', 'noise.png')}" in out
    assert not list(Path(series["monitor_dir"]).glob("*.png"))


def test_report_on_a_directory_without_history_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no history.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_help_runs():
    (script,) = entry_points(group="console_scripts", name="lightning-overtrain")
    assert script.value == "lightning_overtrain.cli:main"
    installed = Path(sys.executable).with_name("lightning-overtrain")
    command = [str(installed)] if installed.exists() else [sys.executable, "-m", script.module]
    result = subprocess.run(
        [*command, "probe", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert result.returncode == 0, result.stderr
    for option in ("--tokens-pattern", "--tokens-map", "--module-class", "--init-std"):
        assert option in result.stdout


def test_the_verdict_says_crossed_or_why_not():
    tokens = [1e6 * 2**k for k in range(10)]
    u_shape = [3.0, 2.6, 2.4, 2.3, 2.25, 2.3, 2.4, 2.55, 2.7, 2.9]
    falling = [3.0 - 0.1 * k for k in range(10)]
    verdicts = {}
    for name, values in (("u", u_shape), ("falling", falling), ("short", falling[:3])):
        history = [
            {
                keys.TOKENS: t,
                "noise/gamma=1/perturbed_loss": v,
                "noise/gamma=1/perturbed_loss_stderr": 0.01,
            }
            for t, v in zip(tokens, values)
        ]
        policy = InflectionPolicy()
        report_module.judge(history, policy)
        (detector,) = policy.detectors.values()
        key = "noise/gamma=1/perturbed_loss"
        config = policy.detector_config
        verdicts[name] = report_module.describe_inflection(key, detector.state, config)
    assert "CROSSED at" in verdicts["u"] and "bottom at 16M tokens" in verdicts["u"]
    assert "no rise above the bottom" in verdicts["falling"]
    assert "needs more" not in verdicts["falling"]
    assert "the detector needs more to decide" in verdicts["short"]
