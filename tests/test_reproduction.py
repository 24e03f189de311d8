"""The paper in miniature (examples/reproduce_paper.py): pinned, regenerable, with intervals."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_overtrain.testing.corpus import (
    CorpusFingerprint,
    corpus_differences,
    foreign_prose,
    pinned_code,
    pinned_files,
)
from lightning_overtrain.testing.demo import english_prose

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PUBLISHED = ROOT / "docs" / "reproduction.json"
HISTORIES = ROOT / "benchmarks" / "results" / "reproduction"
sys.path.insert(0, str(EXAMPLES))

import reproduce_paper  # noqa: E402
import reproduce_stats  # noqa: E402


# ---------------------------------------------------------------------- the corpus
def test_the_corpus_is_a_fixed_list_with_a_fingerprint_of_its_bytes():
    data, fingerprint = pinned_code(300_000)
    assert fingerprint.bytes == len(data) == 300_000
    assert fingerprint.sha256 == hashlib.sha256(data).hexdigest()
    files = pinned_files(300_000)
    assert fingerprint.files == len(files) and files == pinned_files(300_000)
    assert [label for label, _, _ in files] == ["stdlib"] * len(files)
    with open(files[0][2], "rb") as f:
        assert data.startswith(f.read())


def test_a_changed_corpus_is_named_field_by_field():
    _, fingerprint = pinned_code(10_000)
    same = fingerprint.to_dict()
    assert corpus_differences(same, fingerprint) == []
    other = {**same, "sha256": "0" * 64, "torch": "2.0.0"}
    why = corpus_differences(other, fingerprint)
    assert len(why) == 2 and why[0].startswith("sha256: published '000")
    assert "torch: published '2.0.0'" in why[1]
    assert corpus_differences(None, fingerprint) == [
        "the published results record no corpus fingerprint"
    ]


def test_the_downstream_text_uses_bytes_python_source_almost_never_does():
    prose, foreign = english_prose(), foreign_prose()
    assert len(foreign) == len(prose) and bytes(b ^ 0x80 for b in foreign) == prose
    upper = np.frombuffer(foreign, dtype=np.uint8) >= 128
    assert upper.mean() > 0.99
    code, _ = pinned_code(1_000_000)
    assert (np.frombuffer(code, dtype=np.uint8) >= 128).mean() < 0.01


def test_bad_corpus_size_is_a_clear_error():
    with pytest.raises(ValueError, match="`max_bytes` must be >= 1, got 0"):
        pinned_files(0)


# ---------------------------------------------------------------------- the statistics
def test_a_fitted_bottom_finds_the_vertex_between_snapshots():
    x = np.arange(10) * 0.5
    y = (x - 2.2) ** 2
    at, interior = reproduce_stats.fitted_bottom(x, y)
    assert interior and at == pytest.approx(2.2, abs=1e-9)
    at, interior = reproduce_stats.fitted_bottom(x, -x)
    assert not interior and at == x[-1]


def test_bottom_intervals_cover_the_truth_most_of_the_time():
    rng = np.random.default_rng(1)
    x = np.arange(14) * 0.5
    truth = 0.05 * (x - 3.1) ** 2 + 2.0
    covered = []
    for _ in range(30):
        # Common random numbers: each direction is off by its own tilt plus a little jitter.
        tilt = rng.normal(0, 0.01, (8, 1)) * x
        dirs = truth + tilt + rng.normal(0, 0.005, (8, len(x)))
        b = reproduce_stats.bottom_with_interval(x, dirs.mean(axis=0), dirs, rng)
        covered.append(b["interior"] and b["low"] <= 3.1 <= b["high"])
    assert np.mean(covered) >= 0.75


def test_a_lead_over_a_curve_that_never_turned_is_a_lower_bound():
    rng = np.random.default_rng(2)
    x = np.arange(12) * 0.5
    cheap = reproduce_stats.bottom_with_interval(x, (x - 1.5) ** 2, None, rng)
    falling = reproduce_stats.bottom_with_interval(x, 3 - 0.1 * x, None, rng)
    turned = reproduce_stats.bottom_with_interval(x, (x - 4.0) ** 2, None, rng)
    lead = reproduce_stats.lead_with_interval(cheap, turned, step=0.5)
    assert lead["snapshots"] == pytest.approx(5.0) and not lead["lower_bound"]
    assert lead["snapshots_low"] == pytest.approx(5.0) == lead["snapshots_high"]  # no noise
    assert lead["token_factor"] == pytest.approx(2**2.5)
    assert reproduce_stats.lead_with_interval(cheap, falling, step=0.5)["lower_bound"]


# ---------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "reproduce_paper.py"), "--fast", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_fast_mode_writes_every_curve_with_errors_and_every_bottom_with_an_interval(fast_run):
    summary = json.loads((fast_run / "reproduction.json").read_text())
    s, tokens = summary["settings"], summary["tokens"]
    assert summary["corpus"] == pinned_code(s["text_bytes"])[1].to_dict()
    assert len(tokens) == summary["planned_snapshots"] and not summary["incomplete"]
    for seed in s["seeds"]:
        reached = summary["seeds_reached"][str(seed)]
        assert reached["finished"] and reached["snapshots"] == len(tokens)
        assert reached["cpu_seconds"] > 0
    for key, curve in summary["curves"].items():
        assert len(curve["mean"]) == len(curve["se"]) == len(tokens), key
        assert all(math.isfinite(v) for v in curve["se"]), key
    for g in s["gammas"]:
        curve = summary["curves"][f"noise/gamma={g:g}/perturbed_loss"]
        assert len(curve["se_directions"]) == len(tokens)
    cheap = {f"noise gamma={g:g}" for g in s["gammas"]} | {
        "sharpness (update)",
        "sharpness (gradient)",
    }
    assert set(summary["leads"]) == cheap
    for name, per_seed in summary["bottoms"].items():
        assert len(per_seed) == len(s["seeds"])
        for b in per_seed:
            assert b["tokens_low"] <= b["tokens"] <= b["tokens_high"], (name, b)
    for per_target in summary["leads"].values():
        for per_seed in per_target.values():
            for lead in per_seed:
                assert lead["snapshots_low"] <= lead["snapshots_high"]
    ranked = summary["best_predictor"]["ft tuned downstream loss"]
    assert {row["signal"] for row in ranked} == cheap
    alone = summary["pretraining_alone"]
    assert len(alone["downstream_loss_at_init"]) == len(s["seeds"])
    assert (fast_run / "reproduction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_only_refuses_results_of_another_corpus_unless_forced(fast_run, tmp_path):
    summary_path = tmp_path / "published.json"
    other = json.loads((fast_run / "reproduction.json").read_text())
    other["corpus"]["sha256"] = "f" * 64
    summary_path.write_text(json.dumps(other))
    argv = ["--fast", "--out", str(fast_run), "--report-only", "--summary", str(summary_path)]
    argv += ["--figure", str(tmp_path / "figure.png")]
    with pytest.raises(SystemExit, match=r"sha256: published 'fff(.|\n)*Not overwriting it"):
        reproduce_paper.main(argv)
    assert json.loads(summary_path.read_text())["corpus"]["sha256"] == "f" * 64
    rebuilt = reproduce_paper.main([*argv, "--force"])
    assert json.loads(summary_path.read_text())["corpus"] == rebuilt["corpus"] != other["corpus"]


@pytest.mark.slow
def test_a_seed_cut_short_is_reported_as_far_as_it_got(fast_run, tmp_path):
    out = tmp_path / "cut"
    shutil.copytree(fast_run, out)
    history = out / "seed1" / "history.jsonl"
    history.write_text("".join(history.read_text().splitlines(keepends=True)[:2]))
    summary = reproduce_paper.main(["--fast", "--out", str(out), "--report-only"])
    assert summary["incomplete"] and summary["seeds_reached"]["1"]["snapshots"] == 2
    n = summary["curves"]["reference_loss"]["n"]
    assert n[:2] == [2, 2] and set(n[2:]) == {1}


@pytest.mark.skipif(not HISTORIES.is_dir(), reason="no published histories")
def test_the_published_numbers_are_what_todays_code_makes_of_the_published_histories(tmp_path):
    published = json.loads(PUBLISHED.read_text())
    rebuilt = reproduce_paper.main(
        [
            "--out",
            str(HISTORIES),
            "--report-only",
            "--seeds",
            *map(str, published["settings"]["seeds"]),
            "--summary",
            str(tmp_path / "r.json"),
            "--figure",
            str(tmp_path / "r.png"),
            *(["--machine", published["machine"]] if published.get("machine") else []),
        ]
    )
    published.pop("seconds"), rebuilt.pop("seconds")
    # As text: NaN (a curve a seed did not reach) is not equal to itself.
    assert json.dumps(rebuilt, sort_keys=True) == json.dumps(published, sort_keys=True)
    assert CorpusFingerprint(**published["corpus"]).bytes == published["settings"]["text_bytes"]
