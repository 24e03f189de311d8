"""Verdicts a person can check: the values the table shows, forecasts the curve supports."""

import dataclasses
import re

import pytest

import lightning_overtrain.inflection.detector as detector_module
from lightning_overtrain import keys
from lightning_overtrain.cli import report as report_module
from lightning_overtrain.inflection.detector import InflectionDetector
from lightning_overtrain.inflection.forecast import Forecast
from lightning_overtrain.inflection.policy import InflectionPolicy
from lightning_overtrain.inflection.verdicts import forecast_text

SIGNAL = "noise/gamma=1/perturbed_loss"
TOKENS = [1e6 * 2**k for k in range(10)]
FALLING = [3.0 - 0.1 * k for k in range(10)]
# A U whose bottom snapshot (index 4) is an outlier low: the smoothed bottom differs.
U_CURVE = [3.0, 2.6, 2.4, 2.3, 2.18, 2.3, 2.4, 2.55, 2.7, 2.9]


def judged(values, **policy_kwargs):
    history = [
        {keys.TOKENS: t, keys.STEP: i, SIGNAL: v, f"{SIGNAL}_stderr": 0.01}
        for i, (t, v) in enumerate(zip(TOKENS, values))
    ]
    policy = InflectionPolicy(**policy_kwargs)
    history = report_module.judge(history, policy)
    return history, policy, policy.detectors[SIGNAL].state


def test_the_verdict_quotes_the_measured_bottom_the_table_shows_and_names_the_smoothed_one():
    history, policy, state = judged(U_CURVE)
    verdict = report_module.describe_inflection(SIGNAL, state, policy.detector_config)
    assert state.bottom_tokens == TOKENS[4] and state.bottom_measured == 2.18
    assert state.bottom_value != state.bottom_measured  # the median of 3 is smoothed
    table = report_module.summary_table(history)
    (row,) = [line for line in table.splitlines() if line.startswith("| 16M |")]
    assert "2.1800" in row and "measured 2.1800 there" in verdict
    assert f"smoothed {state.bottom_value:.4f}" in verdict
    assert f"latest 2.9000 at {report_module.tokens_text(TOKENS[-1])} tokens" in verdict


def test_a_decision_quotes_the_measured_and_the_smoothed_bottom():
    policy = InflectionPolicy()
    policy.declare(keys.noise_signals([1.0]))
    decisions = [
        d
        for t, v in zip(TOKENS, U_CURVE)
        for d in policy.judge({keys.TOKENS: t, SIGNAL: v, f"{SIGNAL}_stderr": 0.01}).decisions
    ]
    (crossed,) = decisions
    assert "measured 2.1800 there" in crossed.message and "smoothed" in crossed.message


def _past_forecast(monkeypatch):
    # The fit says the turn was at the second snapshot, whatever the curve.
    def fit(tokens, *args, **kwargs):
        return Forecast(tokens[1], tokens[0], tokens[2]) if len(tokens) >= 3 else None

    monkeypatch.setattr(detector_module, "fit_forecast", fit)


def test_a_still_falling_curve_gets_no_forecast_in_the_past(monkeypatch):
    _past_forecast(monkeypatch)
    detector = InflectionDetector()
    for t, v in zip(TOKENS, FALLING):
        state = detector.update(t, v, 0.01)
    assert state.falling and state.forecast_tokens is None
    verdict = report_module.describe_inflection(SIGNAL, state)
    assert "forecast" not in verdict and "no rise above the bottom" in verdict


def test_a_falling_curve_keeps_a_future_forecast_with_its_interval_cut_at_now(monkeypatch):
    monkeypatch.setattr(
        detector_module,
        "fit_forecast",
        lambda tokens, *a, **k: Forecast(2 * tokens[-1], 1.0, 1e12) if tokens else None,
    )
    detector = InflectionDetector()
    for t, v in zip(TOKENS, FALLING):
        state = detector.update(t, v, 0.01)
    assert state.forecast_tokens == 2 * TOKENS[-1]
    assert state.forecast_low == TOKENS[-1]  # the turn cannot have passed already


def test_a_curve_that_has_turned_keeps_a_forecast_in_the_past(monkeypatch):
    _past_forecast(monkeypatch)
    detector = InflectionDetector()
    for t, v in zip(TOKENS, U_CURVE):
        state = detector.update(t, v, 0.01)
    assert not state.falling and state.forecast_tokens == TOKENS[1]


def test_a_far_forecast_is_flagged_not_quoted():
    _, policy, state = judged(U_CURVE[:6])
    far = dataclasses.replace(
        state, forecast_tokens=2.22e14, forecast_low=3e7, forecast_high=float("inf")
    )
    verdict = report_module.describe_inflection(SIGNAL, far, policy.detector_config)
    assert "beyond 10x the observed range" in verdict
    assert "222T" not in verdict and "2.22e+14" not in verdict
    assert "[30M, unbounded]" in verdict
    near = dataclasses.replace(state, forecast_tokens=4e7, forecast_low=3e7, forecast_high=5e9)
    text = forecast_text(near)
    assert text == "forecast T* = 40M tokens [30M, beyond 10x]"


@pytest.mark.parametrize("values", [FALLING, U_CURVE])
def test_every_token_count_in_a_verdict_is_observed_or_flagged(values):
    _, policy, state = judged(values)
    verdict = report_module.describe_inflection(SIGNAL, state, policy.detector_config)
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)([kMBT]) tokens", verdict):
        scale = {"k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[unit]
        assert float(number) * scale <= 10 * TOKENS[-1]
