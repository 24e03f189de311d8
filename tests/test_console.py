"""A run that talks: one console line per snapshot, through Lightning's logging."""

import logging
import math

import pytest
from conftest import make_module, make_trainer, reference_batches, train_loader

from lightning_overtrain import NoiseProbe, OvertrainingMonitor
from lightning_overtrain.reporting.console import (
    ConsoleReporter,
    files_under,
    format_snapshot,
    format_tokens,
    verdict_lines,
)

RECORD = {
    "tokens": 1_778_279,
    "step": 434,
    "reference_loss": 1.92341,
    "noise/gamma=0.25/delta": 0.00712,
    "noise/gamma=0.25/delta_stderr": 0.001,
    "noise/gamma=1/delta": 0.123,
    "noise/gamma=1/layer=h.0/delta": 0.5,  # per-layer: not on the line
    "noise/gamma=1/perturbed_loss": 2.05,
    "inflection/noise/gamma=1/perturbed_loss/crossed": 0.0,
    "inflection/noise/gamma=1/perturbed_loss/forecast_tokens": None,
    "probe_failures": 0,
    "probe_seconds": 4.06,
}


@pytest.mark.parametrize(
    "tokens, text",
    [(0, "0"), (512, "512"), (8192, "8.19k"), (565_248, "565k"), (1e7, "10M"), (2.3e12, "2.3T")],
)
def test_token_counts_read_at_a_glance(tokens, text):
    assert format_tokens(tokens) == text


def test_a_snapshot_line_has_tokens_loss_deltas_verdict_and_cost():
    assert format_snapshot(RECORD) == (
        "OvertrainingMonitor @ 1.78M tokens (step 434): reference loss 1.9234"
        " | delta gamma=0.25 0.0071, gamma=1 0.1230 | no turn yet | probes 4.1 s"
    )


def test_the_verdict_names_a_crossed_signal_and_its_bottom():
    record = {
        **RECORD,
        "inflection/noise/gamma=1/perturbed_loss/crossed": 1.0,
        "inflection/noise/gamma=1/perturbed_loss/bottom_tokens": 1_600_000.0,
        "inflection/finetune/lr=0.001/reference_loss_after/crossed": 0.0,
    }
    line = format_snapshot(record)
    assert "| TURNED UP: noise/gamma=1/perturbed_loss (bottom at 1.6M) |" in line
    assert "finetune" not in line


def test_the_verdict_gives_the_nearest_forecast_ahead_and_failures_show():
    record = {
        **RECORD,
        "inflection/noise/gamma=1/perturbed_loss/forecast_tokens": 5e6,
        "inflection/noise/gamma=0.5/perturbed_loss/forecast_tokens": 9e6,
        "inflection/noise/gamma=0.25/perturbed_loss/forecast_tokens": 1e6,  # in the past
        "probe_failures": 2,
    }
    line = format_snapshot(record)
    assert "| no turn yet (forecast: noise/gamma=1/perturbed_loss at ~5M) |" in line
    assert line.endswith("| probes 4.1 s | 2 probe failure(s) so far")


def test_a_snapshot_whose_probes_failed_still_gets_a_line():
    line = format_snapshot({"tokens": 100, "noise/gamma=1/delta": math.nan})
    assert (
        line
        == "OvertrainingMonitor @ 100 tokens: no reference loss | delta gamma=1 - | no turn yet"
    )


def test_a_renamed_noise_probe_is_labelled_by_its_name():
    line = format_snapshot({"tokens": 1, "reference_loss": 1.0, "wide/gamma=2/delta": 0.5})
    assert "delta wide/gamma=2 0.5000" in line


def fit(tmp_path, code_text, max_steps=4):
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=2),
        every_n_steps=2,
        probes=[NoiseProbe(gammas=(0.5, 1.0), pairs=1)],
        dirpath=tmp_path / "mon",
    )
    make_trainer(tmp_path, [monitor], max_steps=max_steps).fit(
        make_module(), train_loader(code_text)
    )
    return monitor


@pytest.mark.slow
def test_the_monitor_logs_a_line_per_snapshot_and_names_its_files(tmp_path, code_text, caplog):
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    monitor = fit(tmp_path, code_text)
    assert isinstance(monitor.reporters[-1], ConsoleReporter)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lightning.pytorch")]
    snapshots = [line for line in lines if line.startswith("OvertrainingMonitor @ ")]
    assert snapshots == [format_snapshot(r) for r in monitor.history] and len(snapshots) == 2
    last = lines[-1]
    assert last.startswith("OvertrainingMonitor: 2 snapshot(s) up to ")
    for name in ("history.jsonl", "history.csv", "monitor.json", "plots/noise.png"):
        assert name in last and name in files_under(monitor.dirpath)
    assert str(monitor.dirpath) in last


@pytest.mark.slow
def test_the_lines_follow_lightnings_verbosity(tmp_path, code_text, caplog):
    caplog.set_level(logging.INFO)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    try:
        fit(tmp_path, code_text, max_steps=2)
    finally:
        logging.getLogger("lightning.pytorch").setLevel(logging.INFO)
    assert not [r for r in caplog.records if "OvertrainingMonitor @" in r.getMessage()]


def test_a_forecast_far_beyond_the_observed_tokens_is_not_quoted_as_a_date():
    record = {
        "tokens": 5_620_000,
        "step": 1373,
        "reference_loss": 1.575,
        "inflection/finetune/lr=0.001/reference_loss_after/crossed": 0.0,
        "inflection/finetune/lr=0.001/reference_loss_after/forecast_tokens": 1.56e10,
    }
    line = format_snapshot(record)
    assert "15.6B" not in line and "beyond 10x the observed tokens" in line
    record["inflection/finetune/lr=0.001/reference_loss_after/forecast_tokens"] = 9e6
    assert "at ~9M" in format_snapshot(record)


def test_a_rise_above_the_noise_before_the_patience_is_said():
    record = {
        "tokens": 10_000_000,
        "step": 2442,
        "reference_loss": 1.45,
        "inflection/noise/gamma=1/perturbed_loss/crossed": 0.0,
        "inflection/noise/gamma=1/perturbed_loss/rise": 0.25,
        "inflection/noise/gamma=1/perturbed_loss/rise_threshold": 0.16,
    }
    assert "rising above its bottom: noise/gamma=1/perturbed_loss" in format_snapshot(record)
    record["inflection/noise/gamma=1/perturbed_loss/rise"] = 0.1
    assert "rising" not in format_snapshot(record)


def test_the_run_ends_with_a_verdict_per_watched_signal_and_the_kept_snapshot():
    crossed, falling = "noise/gamma=1/perturbed_loss", "noise/gamma=0.5/perturbed_loss"

    def record(tokens, step, crossed_flag, forecast):
        return {
            "tokens": tokens,
            "step": step,
            crossed: 2.3,
            falling: 2.1,
            f"inflection/{crossed}/crossed": crossed_flag,
            f"inflection/{crossed}/bottom_tokens": 1.78e6,
            f"inflection/{falling}/crossed": 0.0,
            f"inflection/{falling}/bottom_tokens": tokens,
            f"inflection/{falling}/forecast_tokens": forecast,
            "best/tokens": 1.78e6,
            "best/value": 2.26,
        }

    history = [
        {**record(1.78e6, 435, 0.0, math.nan), crossed: 2.26},
        record(3.17e6, 773, 0.0, math.nan),
        record(5.62e6, 1373, 1.0, math.nan),
        record(1e7, 2442, 1.0, 2.4e7),
    ]
    lines = verdict_lines(history, "run/best.ckpt")
    assert lines == [
        f"OvertrainingMonitor verdict: {crossed}: CROSSED at 5.62M tokens (bottom at 1.78M"
        " tokens).",
        f"OvertrainingMonitor verdict: {falling}: not crossed yet (bottom at 10M tokens;"
        " forecast to turn at ~24M tokens).",
        "OvertrainingMonitor kept run/best.ckpt: the snapshot at 1.78M tokens (step 435), the"
        f" bottom of {crossed}; fine-tune from it.",
    ]
    far = verdict_lines([record(1e7, 2442, 0.0, 5e8)], None)
    assert far[1].endswith("any forecast turn lies beyond 10x the observed tokens).")
    assert len(far) == 2  # nothing kept, nothing said about it
    past = verdict_lines([record(1e7, 2442, 0.0, 3.61e6)], None)  # the main job's gamma=0.5
    assert past[1].endswith("; the fit has it turned already, not yet above the noise).")
    assert "3.61M" not in past[1]  # never a date in the past, as the snapshot lines
