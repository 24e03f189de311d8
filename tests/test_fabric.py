"""FabricMonitor under DDP on 2 CPU processes: the numbers of one process, state via fabric.save."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "fabric_run.py")


def text(history: list[dict]) -> str:
    """Number for number, without the timing (and NaN equal to NaN)."""
    return json.dumps([{k: v for k, v in r.items() if k != "probe_seconds"} for r in history])


def run(tmp_path, devices: int) -> list[dict]:
    out = tmp_path / f"devices{devices}"
    out.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--devices", str(devices), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"history_rank{r}.json").read_text()) for r in range(devices)]


@pytest.mark.slow
def test_two_fabric_processes_record_what_one_records_and_save_through_fabric(tmp_path):
    (one,) = run(tmp_path, 1)
    two = run(tmp_path, 2)
    assert text(two[0]["history"]) == text(two[1]["history"])  # every rank: the same records
    assert len(one["history"]) == 3
    for single, double in zip(one["history"], two[0]["history"]):
        assert (single["tokens"], single["step"]) == (double["tokens"], double["step"])
        for key in ("reference_loss", "noise/gamma=1/perturbed_loss"):
            assert double[key] == pytest.approx(single[key], rel=1e-4), key
    for run_ in (one, *two):  # fabric.load gave a fresh monitor the saved state
        assert text(run_["loaded"]) == text(run_["history"])
        assert run_["tokens"] == one["history"][-1]["tokens"]
