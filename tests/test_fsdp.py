"""FSDP2 (fully_shard under ModelParallelStrategy) on 2 CPU processes gives the history of
1 unsharded process: reference loss, noise (per layer too), fine-tune (matched loss too),
cooldown, sharpness (relative too), schedule, policy; under bf16-mixed too."""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "fsdp_run.py")


def run(tmp_path, devices: int, *options: str) -> list[dict]:
    out = tmp_path / "_".join([f"devices{devices}", *(o.strip("-") for o in options)])
    out.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, SCRIPT, "--devices", str(devices), "--out", str(out), *options]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0 and "Traceback" not in proc.stderr:
        # Seen once in ~10 runs on a loaded 2-core machine: a rank died with no Python
        # error after its last snapshot (gloo teardown). One more try tells it apart from
        # a real failure, which raises a traceback or fails again.
        warnings.warn(f"fsdp_run.py exited {proc.returncode}, no traceback: retrying", stacklevel=2)
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    return [json.loads((out / f"history_rank{r}.json").read_text()) for r in range(devices)]


def untimed(history: list[dict]) -> str:
    return json.dumps([{k: v for k, v in r.items() if k != "probe_seconds"} for r in history])


@pytest.mark.slow
def test_two_sharded_processes_match_one_unsharded_process(tmp_path):
    (single,) = run(tmp_path, 1)
    rank0, rank1 = run(tmp_path, 2)
    assert rank0["sharded"] and rank1["sharded"] and not single["sharded"]
    assert single["failures"] == rank0["failures"] == rank1["failures"] == 0
    assert untimed(rank0["history"]) == untimed(rank1["history"])  # the ranks agree exactly
    assert len(single["history"]) == len(rank0["history"]) == 2
    probes = ("reference_loss", "noise/gamma=1/delta", "finetune/lr=0.001/forgetting")
    layers = ("noise/gamma=1/layer=embeddings/delta", "noise/gamma=1/layer=h.1/delta")
    cooldown = ("cooldown/train_loss", "cooldown/raw_reference_loss")
    # While a probe holds the model, state_dict() gathers to the live weights (sharded too).
    assert all(r["check/state_dict_live"] == 1.0 for r in (*single["history"], *rank0["history"]))
    for one, two in zip(single["history"], rank0["history"]):
        assert set(one) == set(two)
        assert one["tokens"] == two["tokens"] and one["step"] == two["step"]
        for key in (*probes, *layers, *cooldown):
            assert key in one and one[key] != 0.0, key  # every probe measured something
        for key, value in one.items():
            if isinstance(value, float) and math.isfinite(value) and key != "probe_seconds":
                assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # Each rank backs up its own shard only: half the model each.
    assert rank0["backup_bytes"] == rank0["local_param_bytes"]
    assert rank0["backup_bytes"] + rank1["backup_bytes"] == single["backup_bytes"]
    assert rank0["best_path"] and os.path.exists(rank0["best_path"])


NEW_SIGNALS = (
    "finetune/lr=0.001/matched_reached",
    "schedule/lr",
    "schedule/phase",
)
SHARPNESS = tuple(
    f"{name}/{quantity}"
    for name in ("sharpness", "sharpness_grad")
    for quantity in ("critical_sharpness", "critical_lr", "forward_passes")
) + tuple(
    f"sharpness_grad/relative_{quantity}"
    for quantity in ("critical_sharpness", "critical_lr", "forward_passes", "alignment")
)


@pytest.mark.slow
def test_sharpness_and_the_new_signals_under_fsdp2_give_the_numbers_of_one_process(tmp_path):
    (single,) = run(tmp_path, 1, "--all-probes")
    rank0, rank1 = run(tmp_path, 2, "--all-probes")
    assert rank0["sharded"] and not single["sharded"]
    assert single["failures"] == rank0["failures"] == rank1["failures"] == 0
    assert untimed(rank0["history"]) == untimed(rank1["history"])
    # The matched view ran past the 2-step budget at the first snapshot.
    assert single["history"][0]["finetune/lr=0.001/matched_steps"] > 2
    for one, two in zip(single["history"], rank0["history"]):
        for key in (*SHARPNESS, *NEW_SIGNALS):
            assert key in one and key in two, key
            # Per-shard directions and summed dot products: the line search takes the same
            # decisions (measured: identical values; the alignment within 5e-8).
            assert two[key] == pytest.approx(one[key], rel=1e-6), key
        for key in ("matched_steps", "matched_forgetting"):
            key = f"finetune/lr=0.001/{key}"
            assert (key in one) == (key in two)
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_every_probe_runs_under_bf16_mixed_with_fsdp2_and_training_does_not_notice(tmp_path):
    rank0, rank1 = run(tmp_path, 2, "--all-probes", "--precision", "bf16-mixed")
    plain = run(tmp_path, 2, "--all-probes", "--precision", "bf16-mixed", "--no-monitor")
    assert rank0["sharded"] and rank0["failures"] == rank1["failures"] == 0
    assert untimed(rank0["history"]) == untimed(rank1["history"])  # rank-identical records
    for mine, theirs in zip((rank0, rank1), plain):
        assert mine["losses"] == theirs["losses"]  # bit-identical training, every step
        assert mine["weights"] == theirs["weights"]  # and every shard's final weights
    probes = (
        "reference_loss",
        "noise/gamma=1/delta",
        "noise/gamma=1/layer=h.1/delta",
        "finetune/lr=0.001/forgetting",
        "cooldown/train_loss",
        *SHARPNESS,
        *NEW_SIGNALS,
    )
    assert len(rank0["history"]) == 2
    for record in rank0["history"]:
        assert record["probe_failures"] == 0
        for key in probes:
            assert key in record and math.isfinite(record[key]), key
