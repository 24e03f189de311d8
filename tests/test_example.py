"""The README's main job runs end to end (a short version of it)."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_example_writes_curves_and_an_offline_wandb_run(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "pretrain_tiny.py"),
            "--out",
            str(out),
            "--max-steps",
            "30",
            "--batch-size",
            "8",
            "--start-tokens",
            "8192",
            "--points-per-decade",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == 30 * 8 * 128 and summary["snapshots"] == 2
    lines = (out / "overtrain" / "history.jsonl").read_text().splitlines()
    # Log-spaced thresholds 8192 and 25905 tokens, reached at steps 8 and 26 (1024 tokens a step).
    assert [json.loads(line)["tokens"] for line in lines] == [8192, 26624]
    assert os.path.isdir(summary["wandb_run"]) and any(
        name.endswith(".wandb") for name in os.listdir(summary["wandb_run"])
    )
    last = json.loads(lines[-1])
    assert last["finetune/lr=0.001/forgetting"] == pytest.approx(
        last["finetune/lr=0.001/reference_loss_after"] - last["reference_loss"]
    )
    assert (out / "overtrain" / "plots" / "noise.png").is_file()
    # It talks while it trains: one line per snapshot, through Lightning's logger.
    talk = [line for line in proc.stderr.splitlines() if line.startswith("OvertrainingMonitor @")]
    assert [line.split(" tokens")[0] for line in talk] == [
        "OvertrainingMonitor @ 8.19k",
        "OvertrainingMonitor @ 26.6k",
    ]
    # Its last lines name every file it wrote: history, plots, the best checkpoint.
    listed = proc.stdout.split("Files written:\n")[-1].split()
    for path in (
        out / "overtrain" / "history.jsonl",
        out / "overtrain" / "history.csv",
        out / "overtrain" / "plots" / "noise.png",
        out / "overtrain" / "plots" / "finetune.png",
        out / "overtrain" / "best.ckpt",
        out / "summary.json",
    ):
        assert path.is_file() and str(path) in listed, path
    assert summary["best_checkpoint"] == str(out / "overtrain" / "best.ckpt")
    assert f"W&B run (offline; upload with `wandb sync {summary['wandb_run']}`)" in proc.stdout
    # Quiet: no warning of its own or from a dependency it knows about.
    # (a Python warning prints as `path.py:line: message`, Lightning's format included)
    assert not re.search(r"\.py:\d+: ", proc.stderr), proc.stderr[-3000:]
    assert "loss_type=None" not in proc.stderr and "anonymous setting" not in proc.stderr


@pytest.mark.slow
def test_the_example_warns_of_the_crossing_after_the_bottom_and_never_before(tmp_path):
    """The main job cut at 5.7M tokens: the gamma=1 curve bottoms near 1.8M tokens, and the
    warning comes within 2 snapshots of the bottom, in one line naming the kept snapshot."""
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    script = os.path.join(ROOT, "examples", "pretrain_tiny.py")
    args = ["--out", str(out), "--max-steps", "1400", "--finetune-steps", "5", "--no-wandb"]
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=1800, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    signal = "noise/gamma=1/perturbed_loss"
    history = [json.loads(line) for line in (out / "overtrain" / "history.jsonl").open()]
    values = [r[signal] for r in history]
    bottom = values.index(min(values))
    crossed = [i for i, r in enumerate(history) if r[f"inflection/{signal}/crossed"]]
    assert crossed, values
    assert bottom < crossed[0] <= bottom + 2  # after the bottom, and never before it
    assert crossed == list(range(crossed[0], len(history)))  # it latches
    kept = f"Kept: the snapshot at {history[bottom]['tokens'] / 1e6:.3g}M tokens"
    warnings = [line for line in proc.stderr.splitlines() if f"{signal} has turned upward" in line]
    assert len(warnings) == 1 and kept in warnings[0], proc.stderr[-3000:]
    assert f"{signal}: CROSSED at" in proc.stderr
    assert history[-1]["best/tokens"] == history[bottom]["tokens"]
