"""Output faults and one rank's failure under 2-process DDP: the job goes on, ranks agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "faults_ddp_run.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("faults_ddp")
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    command = ["timeout", "-s", "KILL", "300", sys.executable, SCRIPT, "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_a_monitor_directory_nothing_can_be_written_to_never_stops_a_ddp_job(ranks):
    for rank in ranks:
        assert rank["global_step"] == 6 and len(rank["history"]) == 2  # training went on
        assert rank["best_path"] is None and "best/tokens" in rank["history"][-1]
    rank0, rank1 = ranks
    untimed = [
        [{k: v for k, v in r.items() if k not in ("probe_seconds", "output_failures")} for r in h]
        for h in (rank0["history"], rank1["history"])
    ]
    assert untimed[0] == untimed[1]  # every number agreed
    # The best snapshot's failed write is agreed by both ranks; rank 0 alone writes files.
    assert rank1["output_failures"] >= 1 and rank0["output_failures"] > rank1["output_failures"]
    said = [w for w in rank0["warnings"] if "was not written" in w]
    assert any("FileReporter" in w for w in said) and any("best snapshot" in w for w in said)


@pytest.mark.slow
def test_a_probe_failing_on_one_rank_is_logged_on_rank_zero_with_that_ranks_error(ranks):
    rank0 = ranks[0]
    failed = [w for w in rank0["warnings"] if "fails_on_one_rank probe failed" in w]
    assert failed, rank0["warnings"]
    assert "(rank 1: RuntimeError: only this rank fails)" in failed[0]
    assert ranks[0]["probe_failures"] == ranks[1]["probe_failures"] == 2
