"""DDP on 2 CPU processes (gloo) gives the same curves as 1 process, without deadlock."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_run.py")
NUMBERS = (
    "tokens",
    "step",
    "reference_loss",
    "noise/gamma=1/delta",
    "noise/gamma=0.5/perturbed_loss",
)


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "probe_seconds"} for r in history]


def run(tmp_path, devices: int, *extra: str) -> list[dict]:
    out = tmp_path / f"devices{devices}"
    out.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--devices", str(devices), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"history_rank{r}.json").read_text()) for r in range(devices)]


@pytest.mark.slow
def test_two_processes_match_one_process_and_each_other(tmp_path):
    (single,) = run(tmp_path, 1)
    rank0, rank1 = run(tmp_path, 2)
    assert untimed(rank0["history"]) == untimed(rank1["history"])  # every rank agrees exactly
    # The detectors hold each noise direction's value, the same on every rank (paired test).
    detector = rank0["policy"]["detectors"]["noise/gamma=1/perturbed_loss"]
    assert [len(s) for s in detector["samples"]] == [2, 2]
    assert rank0["policy"] == rank1["policy"]
    assert len(single["history"]) == len(rank0["history"]) == 2
    for one, two in zip(single["history"], rank0["history"]):
        assert one["tokens"] == two["tokens"] and one["step"] == two["step"]
        for key in NUMBERS[2:]:
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_a_probe_failing_on_one_rank_is_skipped_on_all_ranks_without_deadlock(tmp_path):
    rank0, rank1 = run(tmp_path, 2, "--fail-on-rank", "1")
    for rank in (rank0, rank1):
        assert rank["failures"] == 2
        assert all(
            "fails_on_one_rank/ok" not in r and "noise/gamma=1/delta" in r for r in rank["history"]
        )


@pytest.mark.slow
def test_all_ranks_stop_together_when_only_one_rank_would(tmp_path):
    rank0, rank1 = run(tmp_path, 2, "--stop-on-rank", "1")
    assert rank0["global_step"] == rank1["global_step"] == 3
    assert "rankflag/value = 1 exceeds its threshold" in rank1["stop_reason"]
    assert rank0["stop_reason"] == "Another rank's policy decided to stop."


@pytest.mark.slow
def test_ordinary_steps_make_no_conversion_and_no_collective_under_ddp(tmp_path):
    extra = ("--masked", "--every-n-tokens", "1500", "--max-steps", "24", "--count-syncs")
    (single,) = run(tmp_path, 1, *extra)
    rank0, rank1 = run(tmp_path, 2, *extra)
    snapshots = [(r["step"], r["tokens"]) for r in single["history"]]
    assert len(snapshots) >= 4
    for rank in (rank0, rank1):
        assert [(r["step"], r["tokens"]) for r in rank["history"]] == snapshots
        calls = rank["hot_path"]
        synced = [c["step"] for c in calls if c.get("conversions") or c.get("collectives")]
        # The first step is counted exactly (the ranks learn each other's batch sizes);
        # after it, only steps whose bound reaches the next threshold count exactly.
        assert synced[0] == 1
        assert {step for step, _ in snapshots} <= set(synced)
        assert len(synced) <= 1 + 3 * len(snapshots), synced
        quiet = [c for c in calls if c["step"] not in synced]
        assert len(quiet) >= len(calls) / 2
        assert all(not c.get("conversions") and not c.get("collectives") for c in quiet)


@pytest.mark.slow
def test_a_best_snapshot_rank_zero_cannot_write_is_skipped_on_every_rank_without_a_hang(tmp_path):
    rank0, rank1 = run(tmp_path, 2, "--full-disk")
    for rank in (rank0, rank1):
        assert rank["global_step"] == 6 and len(rank["history"]) == 2  # training went on
        # Not a failed judgement: no probe failed, the policy kept the snapshot, no file named.
        assert rank["failures"] == 0 and rank["output_failures"] >= 1
        assert rank["best_path"] is None and "best/tokens" in rank["history"][-1]
    assert rank0["output_failures"] == rank1["output_failures"]  # alike: the ranks agree
