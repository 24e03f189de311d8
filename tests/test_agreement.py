"""Probes failing on some ranks only: agreed by the engine on 2 gloo processes, never a hang."""

import json
import os
import subprocess
import sys

import pytest
from conftest import quadratic_context
from test_noise import Quadratic

from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.probes.noise import NoiseProbe

SCRIPT = os.path.join(os.path.dirname(__file__), "agreement_run.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("agreement")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, SCRIPT, "--out", str(out), "--rendezvous", str(out / "rdv")]
    procs = [
        subprocess.Popen(
            [*command, "--rank", str(rank)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for rank in range(2)
    ]
    try:
        errors = [p.communicate(timeout=240)[1].decode()[-3000:] for p in procs]
    finally:
        for p in procs:  # a hang is the failure this test looks for: leave no orphan
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errors
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def alone() -> dict[str, float]:
    def fail(what, exc):
        raise exc

    probe = NoiseProbe(gammas=(0.5, 1.0), pairs=2)
    return measure_snapshot(quadratic_context(Quadratic()), [probe], fail)


def assert_the_noise_probe_agrees_with_one_process(rank0, rank1, extra=()):
    """The probe after the failing one ran from the live weights, alike on both ranks."""
    assert rank0["record"] == rank1["record"]
    expected = alone()
    assert rank0["record"].keys() == {*expected, *extra}
    for key, value in expected.items():
        assert rank0["record"][key] == pytest.approx(value, rel=1e-12), key
    assert rank0["live_after"] and rank1["live_after"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["before", "after", "uneven", "partial"])
def test_a_probe_failing_on_rank_one_only_is_skipped_on_both_and_the_next_probe_agrees(
    ranks, scenario
):
    rank0, rank1 = (rank[scenario] for rank in ranks)
    assert len(rank0["failures"]) == len(rank1["failures"]) == 1
    if scenario == "uneven":
        assert "make the same collectives" in rank1["failures"][0]
        assert "the ranks made different collectives" in rank0["failures"][0]
    else:
        assert "failed on 1 of 2 rank(s): RuntimeError: rank 1 fails" in rank1["failures"][0]
        healthy = "not on this one" if scenario == "after" else "it failed on 1 other rank"
        assert healthy in rank0["failures"][0]
    # No partial result from rank 0 alone: both ranks record the same.
    assert_the_noise_probe_agrees_with_one_process(rank0, rank1)


@pytest.mark.slow
def test_a_probe_failing_alike_on_every_rank_keeps_its_partial_result(ranks):
    rank0, rank1 = (rank["alike"] for rank in ranks)
    assert rank0["failures"] == rank1["failures"] == ["fails_alike: both ranks fail alike"]
    assert rank0["record"]["fails_alike/sum"] == 2.0
    assert_the_noise_probe_agrees_with_one_process(rank0, rank1, extra=["fails_alike/sum"])
