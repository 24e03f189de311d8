import json
import math

import numpy as np
import pytest

from lightning_overtrain.inflection.config import DetectorConfig
from lightning_overtrain.inflection.crossing import detect_crossing, estimate_noise
from lightning_overtrain.inflection.detector import InflectionDetector, InflectionState
from lightning_overtrain.inflection.forecast import fit_forecast, fit_forecast_decomposed
from lightning_overtrain.testing.synthetic import KINDS, make_curve

TOKENS = np.geomspace(1e6, 1e10, 32)


def u_curve(alpha=0.37, beta=0.53, t_star=1e3, tokens=TOKENS):
    """Exact a + b t^-alpha + c t^beta with its bottom at t = t_star (t = T / T_first)."""
    t = tokens / tokens[0]
    c = alpha / (beta * t_star ** (alpha + beta))
    return 2.0 + t**-alpha + c * t**beta, tokens[0] * t_star


def first_crossing(tokens, values, stderrs=None, **kwargs):
    """Index of the snapshot at which the detector first declares a crossing, or None."""
    det = InflectionDetector(DetectorConfig(forecast=False, **kwargs))
    stderrs = [None] * len(values) if stderrs is None else stderrs
    for i, (t, v, s) in enumerate(zip(tokens, values, stderrs)):
        if det.update(t, v, s).crossed:
            return i
    return None


@pytest.mark.parametrize("patience", [1, 2, 3])
@pytest.mark.parametrize("shape", [(0.37, 0.53, 1e3), (0.5, 0.5, 300), (0.3, 0.8, 2e3)])
@pytest.mark.parametrize("stderr", [0.0, None])
def test_exact_u_crosses_patience_points_past_the_bottom_and_not_before(patience, shape, stderr):
    values, _ = u_curve(*shape)
    bottom = int(np.argmin(values))
    crossed = first_crossing(TOKENS, values, [stderr] * len(values), patience=patience)
    # The robust bottom (a median of three) may cost one snapshot on a noiseless curve.
    assert crossed in (bottom + patience, bottom + patience + 1)


def test_exact_u_crosses_exactly_patience_points_past_a_bottom_that_rises_faster():
    values, _ = u_curve(0.3, 0.8, 2e3)
    bottom = int(np.argmin(values))
    assert values[bottom + 1] > values[bottom - 1]
    assert first_crossing(TOKENS, values, [0.0] * 32, patience=2) == bottom + 2


@pytest.mark.parametrize("alpha", [0.05, 0.3, 1.0, 2.5])
@pytest.mark.parametrize("stderr", [0.0, None])
def test_noiseless_monotone_curve_never_crosses(alpha, stderr):
    values = 2.0 + (TOKENS / TOKENS[0]) ** -alpha
    assert first_crossing(TOKENS, values, [stderr] * 32, patience=1) is None


@pytest.mark.parametrize("kind", ["monotone", "plateau", "spikes"])
@pytest.mark.parametrize("noise", [0.02, 0.05])
@pytest.mark.parametrize("known_stderr", [True, False])
def test_noisy_falling_curves_never_cross_at_defaults(kind, noise, known_stderr):
    for seed in range(15):
        curve = make_curve(kind, 32, seed=seed, noise=noise)
        stderrs = curve.stderrs if known_stderr else None
        assert first_crossing(curve.tokens, curve.values, stderrs) is None, seed


@pytest.mark.parametrize("at", [10, 20, 31])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_single_spike_does_not_cross_with_patience_2(at, sign):
    values = 2.0 + (TOKENS / TOKENS[0]) ** -0.3
    values[at] += sign * 0.5  # half the curve's whole range, in one snapshot
    assert first_crossing(TOKENS, values, [0.001] * 32, patience=2) is None


def test_min_rise_is_respected():
    values, _ = u_curve()
    bottom_value = values.min()
    rise_at_end = values[-1] - bottom_value
    assert first_crossing(TOKENS, values, [0.0] * 32, min_rise=1.01 * rise_at_end) is None
    early = first_crossing(TOKENS, values, [0.0] * 32, min_rise=0.0)
    late = first_crossing(TOKENS, values, [0.0] * 32, min_rise=0.5 * rise_at_end)
    assert early < late
    assert np.all(values[late - 1 : late + 1] - bottom_value > 0.5 * rise_at_end)


def test_crossing_latches_until_reset():
    values, _ = u_curve()
    det = InflectionDetector(DetectorConfig(forecast=False))
    for t, v in zip(TOKENS, values):
        det.update(t, v, 0.0)
    crossed_at = det.state.crossed_at_tokens
    assert det.state.crossed and crossed_at is not None
    state = det.update(TOKENS[-1] * 1.1, values.min())  # back at the bottom
    assert state.crossed and state.crossed_at_tokens == crossed_at
    assert state.consecutive_above == 0
    det.reset()
    assert not det.state.crossed and det.state.n_points == 0 and det.points == []


def test_state_dict_round_trip_resumes_exactly():
    curve = make_curve("u_shape", 32, seed=3, noise=0.02)
    stderrs = [None if i % 5 == 0 else s for i, s in enumerate(curve.stderrs.tolist())]
    snapshots = list(zip(curve.tokens.tolist(), curve.values.tolist(), stderrs))
    original = InflectionDetector()
    for snapshot in snapshots[:20]:
        original.update(*snapshot)
    resumed = InflectionDetector()
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert resumed.state == original.state
    for snapshot in snapshots[20:]:
        assert resumed.update(*snapshot) == original.update(*snapshot)
    assert original.state.crossed


def test_load_state_dict_accepts_an_empty_dict():
    det = InflectionDetector()
    det.load_state_dict({})
    assert det.state.n_points == 0 and not det.state.crossed


@pytest.mark.parametrize("shape", [(0.37, 0.53, 1e3), (0.5, 0.5, 300), (0.25, 1.2, 3e3)])
def test_forecast_recovers_analytic_t_star_from_points_up_to_60_percent(shape):
    values, t_star = u_curve(*shape)
    x = np.log(TOKENS)
    seen = x <= x[0] + 0.6 * (math.log(t_star) - x[0])
    forecast = fit_forecast(TOKENS[seen], values[seen])
    assert forecast is not None
    assert forecast.tokens == pytest.approx(t_star, rel=0.1)
    assert forecast.low <= forecast.tokens <= forecast.high


def test_forecast_interval_covers_t_star_about_as_often_as_its_level():
    covered = 0
    for seed in range(20):
        curve = make_curve("u_shape", 32, seed=seed, noise=0.02)
        forecast = fit_forecast(curve.tokens[:24], curve.values[:24], curve.stderrs[:24])
        covered += (
            forecast is not None and forecast.low <= curve.true_bottom_tokens <= forecast.high
        )
    assert covered >= 13  # 80% intervals: 16 of 20 expected


@pytest.mark.parametrize("alpha", [0.1, 0.42, 1.3])
def test_forecast_is_none_on_a_monotone_curve(alpha):
    values = 2.0 + (TOKENS / TOKENS[0]) ** -alpha
    assert fit_forecast(TOKENS, values) is None
    assert fit_forecast(TOKENS, values, [0.0] * 32) is None


@pytest.mark.parametrize("kind", ["monotone", "spikes"])
def test_forecast_on_noisy_falling_curves_rarely_rules_out_never(kind):
    bounded = 0
    for seed in range(20):
        curve = make_curve(kind, 32, seed=seed, noise=0.02)
        forecast = fit_forecast(curve.tokens, curve.values, curve.stderrs)
        bounded += forecast is not None and forecast.high < math.inf
    assert bounded <= 2


def test_forecast_is_none_with_too_few_points():
    values, _ = u_curve()
    assert fit_forecast(TOKENS[:5], values[:5]) is None
    assert fit_forecast(TOKENS[:8], values[:8], min_points=9) is None


def test_detector_reports_forecast_and_bottom():
    values, t_star = u_curve()
    det = InflectionDetector()
    for t, v in zip(TOKENS, values):
        state = det.update(t, v, 0.0)
    assert state.forecast_tokens == pytest.approx(t_star, rel=0.01)
    assert state.bottom_tokens == TOKENS[np.argmin(values)]
    assert state.bottom_value >= values.min()
    assert state.rise == pytest.approx(values[-1] - state.bottom_value)
    assert state.n_points == 32 and len(det.points) == 32


def test_to_dict_gives_floats_with_nan_for_missing():
    det = InflectionDetector()
    logged = det.update(1e6, 3.0).to_dict()
    assert set(logged) == set(InflectionState.__dataclass_fields__)
    assert all(isinstance(v, float) for v in logged.values())
    assert logged["crossed"] == 0.0 and math.isnan(logged["forecast_tokens"])


def test_estimate_noise_recovers_the_noise_level_and_ignores_curvature():
    rng = np.random.default_rng(0)
    values, _ = u_curve()
    assert estimate_noise(TOKENS, values) < 1e-3 * np.ptp(values)
    noisy = values + 0.01 * rng.standard_normal(32)
    assert 0.007 < estimate_noise(TOKENS, noisy) < 0.016


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patience": 0}, "`patience` must be an int >= 1, got 0. Pass patience=1"),
        ({"min_rise": -0.1}, "`min_rise` must be a finite number >= 0, got -0.1"),
        ({"noise_sigmas": -1.0}, "`noise_sigmas` must be a finite number >= 0"),
        ({"noise_sigmas": math.inf}, "`noise_sigmas`"),
        ({"min_points": 2}, "`min_points` must be an int >= 3, got 2"),
        ({"forecast_level": 1.0}, "`forecast_level` must be strictly between 0 and 1"),
    ],
)
def test_bad_constructor_arguments_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DetectorConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patience": 1.5}, "`patience` must be an int >= 1, got 1.5"),
        ({"patience": True}, "`patience` must be an int"),
        ({"min_rise": "a"}, "`min_rise` must be a number, got 'a'"),
        ({"forecast": 1}, "`forecast` must be a bool"),
    ],
)
def test_wrongly_typed_arguments_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        DetectorConfig(**kwargs)


def test_tokens_must_strictly_increase():
    det = InflectionDetector()
    det.update(1e6, 3.0)
    with pytest.raises(ValueError, match=r"`tokens` must strictly increase, got 1000000\.0 after"):
        det.update(1e6, 2.9)
    with pytest.raises(ValueError, match="`tokens` must strictly increase"):
        det.update(5e5, 2.9)
    assert det.state.n_points == 1


@pytest.mark.parametrize(
    ("tokens", "value", "stderr", "match"),
    [
        (2e6, math.nan, None, "`value` must be a finite number, got nan"),
        (2e6, math.inf, None, "`value`"),
        (2e6, 2.9, -0.1, "`stderr` must be None or a finite number >= 0, got -0.1"),
        (2e6, 2.9, math.nan, "`stderr`"),
        (-1.0, 2.9, None, "`tokens` must be a finite number > 0"),
    ],
)
def test_bad_snapshot_raises_naming_the_argument(tokens, value, stderr, match):
    det = InflectionDetector()
    det.update(1e5, 3.0)
    with pytest.raises(ValueError, match=match):
        det.update(tokens, value, stderr)
    assert det.state.n_points == 1


def test_pure_functions_validate_their_inputs():
    with pytest.raises(ValueError, match="`tokens` must be finite, > 0 and strictly increasing"):
        detect_crossing([1.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="`values` must be finite"):
        fit_forecast([1.0, 2.0], [1.0, math.nan])


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_curves_are_reproducible_and_log_spaced(kind):
    a, b = make_curve(kind, 20, seed=7, noise=0.02), make_curve(kind, 20, seed=7, noise=0.02)
    np.testing.assert_array_equal(a.values, b.values)
    assert np.allclose(np.diff(np.log(a.tokens)), np.log(a.tokens[1] / a.tokens[0]))
    assert np.ptp(a.clean) == pytest.approx(1.0)
    assert np.all(a.stderrs == pytest.approx(0.02))
    if kind in ("u_shape", "late_bend"):
        assert a.tokens[0] < a.true_bottom_tokens < a.tokens[-1]
        nearest = np.argmin(np.abs(np.log(a.tokens / a.true_bottom_tokens)))
        assert abs(int(np.argmin(a.clean)) - int(nearest)) <= 1
    else:
        assert a.true_bottom_tokens is None


def seen_until(curve, fraction):
    """Snapshots up to `fraction` of the way (in log tokens) from the first one to T*."""
    x = np.log(curve.tokens)
    return int(np.sum(x <= x[0] + fraction * (math.log(curve.true_bottom_tokens) - x[0])))


def decomposed(curve, m, known_stderrs=True):
    return fit_forecast_decomposed(
        curve.tokens[:m],
        curve.base[:m],
        curve.base_stderrs[:m] if known_stderrs else None,
        curve.sensitivity[:m],
        curve.sensitivity_stderrs[:m] if known_stderrs else None,
    )


@pytest.mark.parametrize("kind", ["u_shape", "late_bend"])
@pytest.mark.parametrize("floor", [0.0, 0.05])
@pytest.mark.parametrize("known_stderrs", [True, False])
def test_decomposed_forecast_recovers_t_star_on_clean_curves_from_60_percent(
    kind, floor, known_stderrs
):
    for seed in range(4):
        curve = make_curve(kind, 32, seed, noise=0.0, base_noise=0.0, sensitivity_floor=floor)
        forecast = decomposed(curve, seen_until(curve, 0.6), known_stderrs)
        assert forecast is not None, seed
        assert forecast.tokens == pytest.approx(curve.true_bottom_tokens, rel=0.1), seed


def test_decomposed_forecast_is_within_1_5x_for_most_noisy_curves_from_60_percent():
    # delta measured to 10% (the noise probe's spread with 4 antithetic pairs), the
    # reference loss to 0.1% of the curve's range; tuned on other seeds, ~87% expected.
    within = 0
    for seed in range(50):
        curve = make_curve("u_shape", 32, seed, noise=0.1, noise_unit="delta")
        forecast = decomposed(curve, seen_until(curve, 0.6))
        ratio = math.nan if forecast is None else forecast.tokens / curve.true_bottom_tokens
        within += 1 / 1.5 <= ratio <= 1.5
    assert within >= 35


def test_decomposed_forecast_interval_covers_t_star_about_as_often_as_its_level():
    covered = 0
    for seed in range(30):
        curve = make_curve("u_shape", 32, seed, noise=0.1, noise_unit="delta")
        forecast = decomposed(curve, seen_until(curve, 0.6))
        covered += forecast.low <= curve.true_bottom_tokens <= forecast.high
    assert covered >= 20  # 80% intervals: 24 of 30 expected


@pytest.mark.parametrize("sensitivity", ["flat", "falling"])
def test_decomposed_forecast_is_none_when_the_sensitivity_does_not_rise(sensitivity):
    t = TOKENS / TOKENS[0]
    base = 2.0 + t**-0.3
    delta = np.full(32, 0.1) if sensitivity == "flat" else 0.1 + 0.05 * t**-0.2
    assert fit_forecast_decomposed(TOKENS, base, [1e-3] * 32, delta, [1e-3] * 32) is None
    assert fit_forecast_decomposed(TOKENS, base, None, delta, None) is None


def test_decomposed_forecast_on_flat_sensitivities_rarely_rules_out_never():
    bounded = 0
    for seed in range(20):
        curve = make_curve("plateau", 32, seed, noise=0.02)
        forecast = decomposed(curve, 32)
        bounded += forecast is not None and forecast.high < math.inf
    assert bounded <= 2


def test_decomposed_forecast_is_none_with_too_few_points():
    curve = make_curve("u_shape", 32, 0, noise=0.0, base_noise=0.0)
    assert decomposed(curve, 5) is None
    assert (
        fit_forecast_decomposed(
            curve.tokens[:8], curve.base[:8], None, curve.sensitivity[:8], None, min_points=9
        )
        is None
    )


def test_decomposed_forecast_validates_each_term_by_name():
    t, ok = [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="`sensitivity` must be finite"):
        fit_forecast_decomposed(t, ok, None, [1.0, math.nan, 1.0], None)
    with pytest.raises(ValueError, match="`base_stderrs` finite and >= 0"):
        fit_forecast_decomposed(t, ok, [0.1, -0.1, 0.1], ok, None)
    with pytest.raises(ValueError, match="`tokens`, `sensitivity` and `sensitivity_stderrs`"):
        fit_forecast_decomposed(t, ok, None, [1.0, 1.0], None)


def term_snapshots(curve):
    return [
        (t, v, s, {"base": b, "base_stderr": bs, "sensitivity": d, "sensitivity_stderr": ds})
        for t, v, s, b, bs, d, ds in zip(
            *(a.tolist() for a in (curve.tokens, curve.values, curve.stderrs, curve.base)),
            curve.base_stderrs.tolist(),
            curve.sensitivity.tolist(),
            curve.sensitivity_stderrs.tolist(),
        )
    ]


def test_detector_forecasts_from_the_terms_and_crosses_on_the_value():
    curve = make_curve("u_shape", 32, seed=5, noise=0.1, noise_unit="delta")
    with_terms, without = InflectionDetector(), InflectionDetector()
    for t, v, s, terms in term_snapshots(curve)[:20]:
        state = with_terms.update(t, v, s, **terms)
        plain = without.update(t, v, s)
        assert (state.crossed, state.bottom_tokens, state.rise) == (
            plain.crossed,
            plain.bottom_tokens,
            plain.rise,
        )
    expected = decomposed(curve, 20)
    assert expected is not None and plain.forecast_tokens != expected.tokens
    assert (state.forecast_tokens, state.forecast_low, state.forecast_high) == (
        expected.tokens,
        expected.low,
        expected.high,
    )


def test_detector_forecasts_only_from_the_snapshots_that_carry_terms():
    curve = make_curve("u_shape", 32, seed=5, noise=0.1, noise_unit="delta")
    det = InflectionDetector()
    for i, (t, v, s, terms) in enumerate(term_snapshots(curve)[:24]):
        state = det.update(t, v, s, **(terms if i >= 4 else {}))
    m = slice(4, 24)
    expected = fit_forecast_decomposed(
        curve.tokens[m],
        curve.base[m],
        curve.base_stderrs[m],
        curve.sensitivity[m],
        curve.sensitivity_stderrs[m],
    )
    assert state.forecast_tokens == expected.tokens


def test_state_dict_with_terms_round_trips_and_resumes_exactly():
    curve = make_curve("u_shape", 32, seed=3, noise=0.1, noise_unit="delta")
    snapshots = term_snapshots(curve)
    snapshots[7][3]["sensitivity_stderr"] = None
    original = InflectionDetector()
    for t, v, s, terms in snapshots[:18]:
        original.update(t, v, s, **terms)
    saved = original.state_dict()
    assert saved["sensitivities"][:3] == curve.sensitivity[:3].tolist()
    resumed = InflectionDetector()
    resumed.load_state_dict(json.loads(json.dumps(saved)))
    assert resumed.state == original.state and resumed.state_dict() == saved
    for t, v, s, terms in snapshots[18:]:
        assert resumed.update(t, v, s, **terms) == original.update(t, v, s, **terms)
    assert original.state.forecast_tokens is not None


def test_state_dict_from_before_the_terms_loads_as_snapshots_without_them():
    curve = make_curve("u_shape", 32, seed=3, noise=0.02)
    fed = InflectionDetector()
    for t, v, s in zip(curve.tokens.tolist(), curve.values.tolist(), curve.stderrs.tolist()):
        fed.update(t, v, s)
    old = {k: fed.state_dict()[k] for k in ("tokens", "values", "stderrs", "crossed_at_tokens")}
    loaded = InflectionDetector()
    loaded.load_state_dict(old)
    assert loaded.state == fed.state and loaded.state_dict() == fed.state_dict()


@pytest.mark.parametrize(
    ("terms", "match"),
    [
        ({"base": 2.0}, "`base` and `sensitivity` go together, got base=2.0, sensitivity=None"),
        ({"sensitivity": 0.1}, "`base` and `sensitivity` go together"),
        ({"sensitivity_stderr": 0.1}, "`sensitivity_stderr`=0.1 need `base` and `sensitivity`"),
        ({"base": math.nan, "sensitivity": 0.1}, "`base` must be a finite number, got nan"),
        ({"base": 2.0, "sensitivity": math.inf}, "`sensitivity` must be a finite number"),
        (
            {"base": 2.0, "sensitivity": 0.1, "base_stderr": -1.0},
            "`base_stderr` must be None or a finite number >= 0, got -1.0",
        ),
    ],
)
def test_bad_terms_raise_naming_the_argument_and_add_no_snapshot(terms, match):
    det = InflectionDetector()
    det.update(1e5, 3.0)
    with pytest.raises(ValueError, match=match):
        det.update(2e5, 2.9, **terms)
    assert det.state.n_points == 1 and len(det.state_dict()["bases"]) == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("noise_unit", ["range", "delta"])
def test_synthetic_terms_add_up_to_the_curve(kind, noise_unit):
    curve = make_curve(kind, 32, seed=2, noise=0.1, noise_unit=noise_unit)
    np.testing.assert_allclose(curve.base + curve.sensitivity, curve.values, atol=1e-12)
    np.testing.assert_allclose(curve.base_clean + curve.sensitivity_clean, curve.clean)
    assert np.all(curve.base_stderrs == pytest.approx(0.001))
    assert np.std(curve.base - curve.base_clean) < 0.003
    if kind in ("u_shape", "late_bend"):
        assert np.all(np.diff(curve.sensitivity_clean) > 0)
        assert np.all(np.diff(curve.base_clean) < 0)
    else:
        assert np.ptp(curve.sensitivity_clean) == 0.0
    if noise_unit == "delta":
        np.testing.assert_allclose(curve.stderrs, 0.1 * curve.sensitivity_clean)
    else:
        assert np.all(curve.stderrs == pytest.approx(0.1))


def test_sensitivity_floor_lifts_the_sensitivity_and_keeps_the_curve():
    low, high = (make_curve("u_shape", 32, seed=4, sensitivity_floor=f) for f in (0.0, 0.1))
    np.testing.assert_allclose(high.sensitivity_clean - low.sensitivity_clean, 0.1)
    np.testing.assert_allclose(high.clean, low.clean)
    assert low.sensitivity_clean[0] < 1e-3


def crn_curve(seed, rise=True, k=4, noise=0.002, spread=0.3, n=16):
    """A U (or, without `rise`, a falling curve) seen through k fixed samples: each its own
    smooth curve (its own sensitivity, spread across samples) plus independent noise."""
    rng = np.random.default_rng(seed)
    t = TOKENS[:n] / TOKENS[0]
    scales = np.exp(spread * rng.standard_normal(k))[:, None]
    sens = 0.3 * (t / t[8]) ** 0.6 if rise else np.zeros(n)
    samples = 2.0 + t**-0.4 + scales * sens + noise * rng.standard_normal((k, n))
    values = samples.mean(axis=0)
    stderrs = samples.std(axis=0, ddof=1) / math.sqrt(k)
    return TOKENS[:n], values, stderrs, samples.T


def crossing_index(tokens, values, stderrs, samples=None):
    det = InflectionDetector(DetectorConfig(forecast=False))
    for i, t in enumerate(tokens):
        state = det.update(
            t, values[i], stderrs[i], samples=None if samples is None else samples[i]
        )
        if state.crossed:
            return i
    return None


def test_paired_samples_call_a_rise_that_the_spread_across_samples_hides():
    tokens, values, stderrs, samples = crn_curve(seed=0)
    bottom = int(np.argmin(values))
    paired = crossing_index(tokens, values, stderrs, samples)
    unpaired = crossing_index(tokens, values, stderrs)
    assert paired is not None and bottom < paired
    assert unpaired is None or paired < unpaired


@pytest.mark.parametrize("seed", range(8))
def test_a_falling_curve_seen_through_samples_never_crosses(seed):
    tokens, values, stderrs, samples = crn_curve(seed, rise=False, n=24)
    assert crossing_index(tokens, values, stderrs, samples) is None


def test_the_paired_rise_is_measured_from_the_bottom_snapshot():
    tokens, values, stderrs, samples = crn_curve(seed=1)
    found = detect_crossing(tokens, values, stderrs, samples=[list(s) for s in samples])
    assert found.rise == pytest.approx(values[-1] - values[found.bottom_index])
    unpaired = detect_crossing(tokens, values, stderrs)
    assert found.rise_threshold < unpaired.rise_threshold / 2


@pytest.mark.parametrize(
    ("samples", "error", "match"),
    [
        ([2.0], ValueError, "`samples` must hold 2 values or more, got 1"),
        ([2.0, math.nan], ValueError, "`samples` must be a finite number, got nan"),
        ("ab", TypeError, "`samples` must be a sequence of numbers"),
        (2.0, TypeError, "`samples` must be a sequence of numbers"),
    ],
)
def test_bad_samples_raise_naming_the_argument(samples, error, match):
    det = InflectionDetector()
    with pytest.raises(error, match=match):
        det.update(1e6, 2.0, samples=samples)
    assert det.state.n_points == 0


def test_samples_survive_a_json_round_trip_bit_exactly():
    tokens, values, stderrs, samples = crn_curve(seed=2)
    whole, first = InflectionDetector(), InflectionDetector()
    for i in range(len(tokens)):
        whole.update(tokens[i], values[i], stderrs[i], samples=samples[i])
        if i < 9:
            first.update(tokens[i], values[i], stderrs[i], samples=samples[i])
    resumed = InflectionDetector()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.state_dict() == first.state_dict()
    for i in range(9, len(tokens)):
        resumed.update(tokens[i], values[i], stderrs[i], samples=samples[i])
    assert json.dumps(resumed.state_dict()) == json.dumps(whole.state_dict())
    assert json.dumps(resumed.state.to_dict()) == json.dumps(whole.state.to_dict())


def test_an_old_state_without_samples_loads_and_judges_unpaired():
    tokens, values, stderrs, samples = crn_curve(seed=3)
    paired, unpaired = InflectionDetector(), InflectionDetector()
    for i in range(10):
        paired.update(tokens[i], values[i], stderrs[i], samples=samples[i])
        unpaired.update(tokens[i], values[i], stderrs[i])
    old = {k: v for k, v in paired.state_dict().items() if k != "samples"}
    loaded = InflectionDetector()
    loaded.load_state_dict(old)
    assert loaded.state == unpaired.state


def test_detector_settings_come_one_way():
    with pytest.raises(TypeError, match="patience"):
        InflectionDetector(patience=2)
    with pytest.raises(TypeError, match="`config` must be a DetectorConfig"):
        InflectionDetector({"patience": 2})
    assert InflectionDetector(DetectorConfig(patience=3)).config.patience == 3
