"""Validate the inflection detector and the forecast at their defaults on synthetic curves.

For each noise setting and curve kind (``lightning_overtrain.testing.synthetic``, 32 log-spaced
snapshots over 1e6..1e10 tokens) it measures, in two tables:

Detection (``crossed``, decided on the perturbed loss alone):

- false alarms: the share of curves that never turn up (monotone, plateau, spikes) on
  which the detector declares a crossing anywhere (goal <= 1%);
- on U-shaped curves (u_shape, late_bend), two clocks. From the true bottom: the share
  declared crossed after the bottom snapshot and at most ``WINDOW`` snapshots later (goal
  >= 95%), by the end of the range, too early, and the median delay. From the moment the
  rise is statistically visible, defined as the first snapshot ending ``patience`` in a row
  whose noiseless rise above the bottom exceeds ``VISIBLE_SIGMAS`` standard errors of the
  difference (``sqrt(se_i**2 + se_bottom**2)``, true noise): the share of curves where that
  happens inside the range, and the share of those declared crossed at most ``LAG``
  snapshots after it (and after the bottom).

Forecast of ``T*`` (on U-shaped curves, the first ``FORECAST_CURVES`` of each cell), with
the snapshots up to 40%, 60% and 80% of the way (in log tokens) from the first snapshot
to the true ``T*``: the share within a factor 1.5 (goal >= 80% at 60%; no forecast counts
as a miss) of :func:`fit_forecast_decomposed` on the two terms (reference loss and
``delta``, as the monitor measures them), at 60% how often there is none and how often
``T*`` lies in its 80% interval, and for comparison :func:`fit_forecast` on the perturbed
loss alone at 60%. On the flat kinds: the share whose forecast from the whole curve rules
out "never turns up" (bounded interval), a confident but spurious forecast.

Two noise models. "of range": noise std a fixed fraction of the U's dynamic range at
every snapshot, on delta and so on the perturbed loss (pessimistic early on, where delta
is small). "of delta": std a fraction of delta itself at each snapshot, which is how the
noise probe's spread across noise directions behaves (8-20% of delta per antithetic pair
in the prototype this package grew from: 4-10% with 4 pairs). The reference loss has
noise 0.1% of the range.
"floor 2%": delta starts on a floor of 2% of the range instead of rising from about zero.

The defaults were tuned on seeds from 7,000,000 up (crossing) and 10,000,000..10,000,299
(the decomposed forecast); the reported run (``--seed-offset 0``) uses seeds
1,000,000..5,080,399, none of which tuning saw. 3-5 CPU-minutes (under 3 minutes on 2 idle
cores). Run from the repository root::

    python benchmarks/detector_validation.py        # writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from lightning_overtrain.inflection.crossing import (
    DEFAULT_FORECAST_LEVEL,
    DEFAULT_MIN_POINTS,
    DEFAULT_NOISE_SIGMAS,
    DEFAULT_PATIENCE,
)
from lightning_overtrain.inflection.detector import InflectionDetector
from lightning_overtrain.inflection.forecast import fit_forecast, fit_forecast_decomposed
from lightning_overtrain.testing.synthetic import make_curve

N_POINTS = 32  # 1e6..1e10 tokens, 1.35x apart: a little denser than a sqrt(2) cadence
WINDOW = 6  # "within a few snapshots" of the true bottom
VISIBLE_SIGMAS = 2.0  # a rise is visible at 2 standard errors of a difference
LAG = 3  # snapshots allowed after the rise becomes visible
FORECAST_AT = (0.4, 0.6, 0.8)  # fractions of the way to T*, in log tokens from the first
FACTOR = 1.5
FORECAST_CURVES = 150
VALUE_FIT_CURVES = 60  # the single-curve fit, for comparison only
FLAT_KINDS = ("monotone", "plateau", "spikes")
U_KINDS = ("u_shape", "late_bend")
# (label, noise, noise unit, reported stderr scale or None for unknown, delta's floor)
SETTINGS = (
    ("0.5% of range", 0.005, "range", 1.0, 0.0),
    ("2% of range", 0.02, "range", 1.0, 0.0),
    ("5% of range", 0.05, "range", 1.0, 0.0),
    ("2% of range, stderr unknown", 0.02, "range", None, 0.0),
    ("2% of range, stderr 0.7x", 0.02, "range", 0.7, 0.0),
    ("5% of delta", 0.05, "delta", 1.0, 0.0),
    ("10% of delta", 0.10, "delta", 1.0, 0.0),
    ("20% of delta", 0.20, "delta", 1.0, 0.0),
    ("10% of delta, floor 2%", 0.10, "delta", 1.0, 0.02),
)
GOALS = {"false_alarm": ("<=", 0.01), "detected": (">=", 0.95), "forecast_60": (">=", 0.80)}


def _curve(kind: str, seed: int, setting: tuple):
    _, noise, unit, scale, floor = setting
    curve = make_curve(
        kind,
        N_POINTS,
        seed,
        noise,
        noise_unit=unit,
        stderr_scale=scale or 1.0,
        sensitivity_floor=floor,
    )
    known = scale is not None
    return curve, known


def _stderrs(array: np.ndarray, known: bool) -> list:
    return array.tolist() if known else [None] * len(array)


def _first_crossing(curve, known: bool) -> int | None:
    """Index of the snapshot at which the default detector first declares a crossing."""
    det = InflectionDetector(forecast=False)
    for i, (t, v, s) in enumerate(zip(curve.tokens, curve.values, _stderrs(curve.stderrs, known))):
        if det.update(t, v, s).crossed:
            return i
    return None


def _visible_at(curve) -> int | None:
    """First snapshot ending `patience` in a row whose noiseless rise stands out of the noise."""
    bottom = int(np.argmin(curve.clean))
    se = np.sqrt(curve.noise_stds**2 + curve.noise_stds[bottom] ** 2)
    above = curve.clean - curve.clean[bottom] > VISIBLE_SIGMAS * se
    for i in range(bottom + DEFAULT_PATIENCE, len(curve.clean)):
        if above[i - DEFAULT_PATIENCE + 1 : i + 1].all():
            return i
    return None


def _forecast(curve, known: bool, m: int, decomposed: bool):
    if decomposed:
        return fit_forecast_decomposed(
            curve.tokens[:m],
            curve.base[:m],
            _stderrs(curve.base_stderrs[:m], known),
            curve.sensitivity[:m],
            _stderrs(curve.sensitivity_stderrs[:m], known),
        )
    return fit_forecast(curve.tokens[:m], curve.values[:m], _stderrs(curve.stderrs[:m], known))


def _seen(curve, fraction: float) -> int:
    x = np.log(curve.tokens)
    return int(np.sum(x <= x[0] + fraction * (math.log(curve.true_bottom_tokens) - x[0])))


def _within(forecast, truth: float) -> bool:
    return forecast is not None and 1 / FACTOR <= forecast.tokens / truth <= FACTOR


def _seed(offset: int, kind: str, setting: int, i: int) -> int:
    return offset + 1_000_000 * (1 + (U_KINDS + FLAT_KINDS).index(kind)) + 10_000 * setting + i


def evaluate_cell(task: tuple[int, str, int, int]) -> dict:
    """All metrics for one (setting, kind) cell."""
    s_index, kind, n_curves, seed_offset = task
    start = time.process_time()
    setting = SETTINGS[s_index]
    row: dict = {"setting": setting[0], "kind": kind, "curves": n_curves}
    n_forecast = min(n_curves, FORECAST_CURVES)
    curves = [_curve(kind, _seed(seed_offset, kind, s_index, i), setting) for i in range(n_curves)]
    crossings = [_first_crossing(c, known) for c, known in curves]
    if kind in FLAT_KINDS:
        row["false_alarm"] = float(np.mean([k is not None for k in crossings]))
        for key, decomposed, n in (
            ("spurious_terms", True, n_forecast),
            ("spurious_value", False, min(n_curves, VALUE_FIT_CURVES)),
        ):
            forecasts = [_forecast(c, known, N_POINTS, decomposed) for c, known in curves[:n]]
            row[key] = float(np.mean([f is not None and f.high < math.inf for f in forecasts]))
        row["cpu_seconds"] = time.process_time() - start
        return row
    delays, early, visible, prompt = [], 0, 0, 0
    for (curve, _), crossed in zip(curves, crossings):
        bottom = int(np.argmin(curve.clean))
        if crossed is not None and crossed <= bottom:
            early += 1
        elif crossed is not None:
            delays.append(crossed - bottom)
        seen = _visible_at(curve)
        if seen is not None:
            visible += 1
            prompt += crossed is not None and bottom < crossed <= seen + LAG
    row.update(
        detected=float(np.sum(np.array(delays) <= WINDOW)) / n_curves,
        detected_by_end=len(delays) / n_curves,
        early=early / n_curves,
        median_delay=float(np.median(delays)) if delays else math.nan,
        visible=visible / n_curves,
        detected_when_visible=prompt / max(visible, 1),
    )
    for fraction in FORECAST_AT:
        key = f"forecast_{round(100 * fraction)}"
        hits, covered, none = 0, 0, 0
        for curve, known in curves[:n_forecast]:
            forecast = _forecast(curve, known, _seen(curve, fraction), decomposed=True)
            hits += _within(forecast, curve.true_bottom_tokens)
            none += forecast is None
            covered += (
                forecast is not None and forecast.low <= curve.true_bottom_tokens <= forecast.high
            )
        row[key] = hits / n_forecast
        if fraction == 0.6:
            row["forecast_60_none"] = none / n_forecast
            row["forecast_60_coverage"] = covered / max(n_forecast - none, 1)
    row["forecast_60_value"] = float(
        np.mean(
            [
                _within(_forecast(c, known, _seen(c, 0.6), False), c.true_bottom_tokens)
                for c, known in curves[:VALUE_FIT_CURVES]
            ]
        )
    )
    row["cpu_seconds"] = time.process_time() - start
    return row


def _cell(row: dict, key: str, kind: str = "pct") -> str:
    value = row.get(key)
    if value is None or math.isnan(value):
        return "-"
    text = f"{value:g}" if kind == "num" else f"{100 * value:.1f}%"
    if key in GOALS:
        op, goal = GOALS[key]
        if not (value <= goal if op == "<=" else value >= goal):
            text += " **miss**"
    return text


DETECTION_COLUMNS = (
    ("false alarms (<=1%)", "false_alarm", "pct"),
    (f"crossed 1-{WINDOW} after bottom (>=95%)", "detected", "pct"),
    ("by end", "detected_by_end", "pct"),
    ("early", "early", "pct"),
    ("median delay", "median_delay", "num"),
    ("rise visible in range", "visible", "pct"),
    (f"crossed <= {LAG} after visible", "detected_when_visible", "pct"),
)
FORECAST_COLUMNS = (
    (f"at 40% within {FACTOR}x", "forecast_40", "pct"),
    (f"at 60% within {FACTOR}x (>=80%)", "forecast_60", "pct"),
    (f"at 80% within {FACTOR}x", "forecast_80", "pct"),
    ("at 60%: none", "forecast_60_none", "pct"),
    ("at 60%: 80% interval covers T*", "forecast_60_coverage", "pct"),
    (f"value-only fit at 60% within {FACTOR}x*", "forecast_60_value", "pct"),
    ("spurious (terms)", "spurious_terms", "pct"),
    ("spurious (value-only)*", "spurious_value", "pct"),
)


def _table(rows: list[dict], columns: tuple, kinds: tuple | None = None) -> list[str]:
    lines = [
        "| noise | kind | " + " | ".join(c[0] for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for row in rows:
        if kinds is None or row["kind"] in kinds:
            cells = [_cell(row, key, kind) for _, key, kind in columns]
            lines.append(f"| {row['setting']} | {row['kind']} | " + " | ".join(cells) + " |")
    return lines


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Inflection detector validation",
        "",
        f"Defaults: patience={meta['patience']}, noise_sigmas={meta['noise_sigmas']},"
        f" min_points={meta['min_points']}, forecast_level={meta['forecast_level']}."
        f" {meta['curves']} curves per row ({meta['forecast_curves']} for forecasts),"
        f" {N_POINTS} log-spaced snapshots over 1e6..1e10 tokens, seed offset"
        f" {meta['seed_offset']}. Noise on delta (and so on the perturbed loss): a fraction"
        " of the U's dynamic range, or of delta itself; reference loss to 0.1% of the range."
        f" Produced by `python benchmarks/detector_validation.py` in {meta['seconds']:.0f} s"
        f" on {meta['workers']} processes ({meta['cpu_seconds']:.0f} CPU-seconds)."
        " Definitions: see the script's docstring.",
        "",
        "## Detection (`crossed`, on the perturbed loss)",
        "",
        *_table(rows, DETECTION_COLUMNS),
        "",
        "## Forecast of T* (decomposed fit on reference loss + delta, unless noted)",
        "",
        *_table(rows, FORECAST_COLUMNS),
        "",
        f"\\* `fit_forecast` on the perturbed loss alone, on the first {VALUE_FIT_CURVES}"
        " curves of each row.",
        "",
        "## README paragraph",
        "",
        readme_paragraph(rows),
    ]
    return "\n".join(lines) + "\n"


def readme_paragraph(rows: list[dict]) -> str:
    """The README's "Inflection point" paragraph, with this run's numbers."""

    def get(setting: str, kind: str, key: str) -> float:
        return next(r[key] for r in rows if r["setting"] == setting and r["kind"] == kind)

    def pct(value: float) -> str:
        return f"{100 * value:.0f}%" if value >= 0.095 else f"{100 * value:.1f}%"

    def pair(setting: str, key: str) -> str:
        return "/".join(pct(get(setting, kind, key)) for kind in U_KINDS)

    false_alarm = max(r["false_alarm"] for r in rows if r["kind"] in FLAT_KINDS)
    spurious = max(r["spurious_terms"] for r in rows if r["kind"] in FLAT_KINDS)
    coverage = [r["forecast_60_coverage"] for r in rows if r["kind"] in U_KINDS]
    coverage = [c for c in coverage if c == c]
    value_fit = max(r["forecast_60_value"] for r in rows if r["kind"] in U_KINDS)
    text = (
        "`InflectionDetector` watches each probe signal over tokens. **Crossed**: the curve's"
        " bottom (a median of three snapshots) is in the past and the latest `patience`"
        " snapshots sit above it by more than `noise_sigmas` standard errors and `min_rise`."
        " **Forecast**: given the perturbed loss as its"
        " two terms, the reference loss `a+b*T^-alpha` and the sensitivity `delta=d+c*T^beta`,"
        " it fits each on its own and projects `T*=(alpha*b/(beta*c))^(1/(alpha+beta))` with"
        " an 80% interval (likelihood-weighted over the exponents). On synthetic curves"
        " (`benchmarks/results/detector_validation.md`, seeds unseen in tuning): false alarms"
        f" at most {pct(false_alarm)} (goal <= 1%). Crossed within {WINDOW} snapshots of the"
        f" true bottom: {pair('2% of range', 'detected')} (u_shape/late_bend, noise 2% of"
        f" range; goal 95%), but within {LAG} of the rise becoming 2-sigma visible:"
        f" {pair('2% of range', 'detected_when_visible')} (a broad bottom cannot be seen"
        " sooner). Forecast from 60% of the way to T* within"
        f" 1.5x (goal 80%): {pair('5% of delta', 'forecast_60')} with delta measured to 5%,"
        f" {pair('10% of delta', 'forecast_60')} to 10%, {pair('20% of delta', 'forecast_60')}"
        f" to 20%; only {pair('10% of delta, floor 2%', 'forecast_60')} when delta starts on"
        f" a floor of 2% of the range and {pair('2% of range', 'forecast_60')} when its noise"
        " is 2% of the range (the early rise is buried; the intervals widen: coverage"
        f" {pct(min(coverage))}-{pct(max(coverage))}). A falling curve gets a bounded forecast"
        f" in at most {pct(spurious)}. Signals without the two terms (the fine-tune probe's)"
        f" get a single-curve fit, far weaker (at most {pct(value_fit)} within 1.5x at 60%)."
        " Decide on `crossed`; the forecast is an early hint."
    )
    return textwrap.fill(text, width=100, break_on_hyphens=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=int, default=400, help="curves per setting and kind")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    start = time.perf_counter()
    tasks = [
        (s, kind, args.curves, args.seed_offset)
        for s in range(len(SETTINGS))
        for kind in FLAT_KINDS + U_KINDS
    ]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(evaluate_cell, tasks))
    meta = {
        "patience": DEFAULT_PATIENCE,
        "noise_sigmas": DEFAULT_NOISE_SIGMAS,
        "min_points": DEFAULT_MIN_POINTS,
        "forecast_level": DEFAULT_FORECAST_LEVEL,
        "curves": args.curves,
        "forecast_curves": min(args.curves, FORECAST_CURVES),
        "seed_offset": args.seed_offset,
        "workers": args.workers,
        "n_points": N_POINTS,
        "window": WINDOW,
        "visible_sigmas": VISIBLE_SIGMAS,
        "lag": LAG,
        "forecast_at": FORECAST_AT,
        "factor": FACTOR,
        "settings": SETTINGS,
        "goals": GOALS,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": sum(row.pop("cpu_seconds") for row in rows),
    }
    table = to_markdown(rows, meta)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    plain = [{k: None if v != v else v for k, v in row.items()} for row in rows]  # NaN: null
    with open(os.path.join(args.out, "detector_validation.json"), "w") as f:
        json.dump({"meta": meta, "rows": plain}, f, indent=2)
    with open(os.path.join(args.out, "detector_validation.md"), "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
