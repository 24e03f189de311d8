"""The detector: the snapshots of one signal, its crossing latch and its forecast.

:class:`InflectionDetector` holds the snapshots and the latch (once crossed, it
stays crossed) and goes through ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from lightning_overtrain.inflection.config import DetectorConfig, check_number
from lightning_overtrain.inflection.crossing import detect_crossing
from lightning_overtrain.inflection.forecast import (
    Forecast,
    fit_forecast,
    fit_forecast_decomposed,
)


@dataclass(frozen=True)
class InflectionState:
    """The detector's view after the latest snapshot.

    ``bottom_value`` is smoothed (the median of 3 neighbouring snapshots, robust to one
    outlier); ``bottom_measured`` is the value measured at ``bottom_tokens``, as a table
    of the records shows it. ``rise`` is ``latest_value - bottom_value``. A forecast
    ``T*`` before ``latest_tokens`` is never given while the curve is still falling.
    """

    crossed: bool
    crossed_at_tokens: float | None
    bottom_tokens: float | None
    bottom_value: float | None
    bottom_stderr: float | None
    bottom_measured: float | None
    rise: float | None
    rise_threshold: float | None
    consecutive_above: int
    forecast_tokens: float | None
    forecast_low: float | None
    forecast_high: float | None
    n_points: int
    latest_tokens: float | None = None
    latest_value: float | None = None
    paired: bool = False

    @property
    def falling(self) -> bool:
        """The latest snapshot is at (or below) the bottom: the curve has not turned yet."""
        return self.n_points > 0 and (
            self.bottom_tokens == self.latest_tokens or (self.rise is not None and self.rise <= 0)
        )

    def to_dict(self) -> dict[str, float]:
        """Every field as a float for loggers: booleans as 0/1, None as NaN."""
        return {k: math.nan if v is None else float(v) for k, v in asdict(self).items()}


_TERM_KEYS = ("bases", "base_stderrs", "sensitivities", "sensitivity_stderrs")


def _check_stderr(name: str, stderr: Any, none: str) -> float | None:
    if stderr is None:
        return None
    fix = f"Pass the standard error, or None to {none}."
    return check_number(name, stderr, "None or a finite number >= 0", fix, lambda v: v >= 0)


def _check_terms(base: Any, base_stderr: Any, sensitivity: Any, sensitivity_stderr: Any):
    # The snapshot's (base, base_stderr, sensitivity, sensitivity_stderr), or None.
    if base is None and sensitivity is None:
        if base_stderr is not None or sensitivity_stderr is not None:
            raise ValueError(
                f"`base_stderr`={base_stderr!r} and `sensitivity_stderr`={sensitivity_stderr!r}"
                " need `base` and `sensitivity`. Pass the terms with their stderrs, or neither."
            )
        return None
    if base is None or sensitivity is None:
        raise ValueError(
            f"`base` and `sensitivity` go together, got base={base!r},"
            f" sensitivity={sensitivity!r}. Pass both (e.g. the reference loss and delta) or"
            " neither."
        )
    fix = "Skip a snapshot whose probe failed instead."
    return (
        check_number("base", base, "a finite number", fix, lambda v: True),
        _check_stderr("base_stderr", base_stderr, "fit the base unweighted"),
        check_number("sensitivity", sensitivity, "a finite number", fix, lambda v: True),
        _check_stderr("sensitivity_stderr", sensitivity_stderr, "fit it unweighted"),
    )


def _check_samples(samples: Any) -> tuple[float, ...] | None:
    if samples is None:
        return None
    fix = "Pass one finite value per sample (2 or more), in the same order every time, or None."
    if isinstance(samples, (str, bytes)) or not hasattr(samples, "__len__"):
        raise TypeError(f"`samples` must be a sequence of numbers, got {samples!r}. {fix}")
    values = tuple(
        check_number("samples", v, "a finite number", fix, lambda v: True) for v in samples
    )
    if len(values) < 2:
        raise ValueError(f"`samples` must hold 2 values or more, got {len(values)}. {fix}")
    return values


def _not_in_the_past(forecast: Forecast, latest: float) -> Forecast | None:
    # A curve still falling at `latest` has not turned before it: a T* in the past is a
    # misfit, not news, and an interval reaching into the past is cut at `latest`.
    if forecast.tokens < latest or forecast.high < latest:
        return None
    return Forecast(forecast.tokens, max(forecast.low, latest), forecast.high)


class InflectionDetector:
    """Watches one probe signal over tokens: has it crossed its inflection, and when will it?

    Feed it one snapshot at a time with :meth:`update`. Crossing latches: once
    declared it stays, with the token count where it was first declared, until
    :meth:`reset`. The maths is in :func:`detect_crossing` and :func:`fit_forecast`;
    snapshots that also carry the signal's two terms (``base`` and ``sensitivity``: the
    reference loss and ``delta``) are forecast by :func:`fit_forecast_decomposed`, which
    is far better determined.

    Args:
        config: the settings (:class:`DetectorConfig`); None: the defaults.

    Raises:
        TypeError: On a ``config`` that is not a :class:`DetectorConfig`.

    Example::

        det = InflectionDetector(DetectorConfig(patience=2))
        for tokens, loss, stderr in snapshots:
            state = det.update(tokens, loss, stderr)
            if state.crossed:
                print(f"turned up at {state.crossed_at_tokens:.3g} tokens")
        # With the terms: the perturbed loss is reference loss + delta.
        det.update(tokens, ref + delta, delta_se, base=ref, sensitivity=delta,
                   sensitivity_stderr=delta_se)
        # With the value of each noise direction (the same directions every time).
        det.update(tokens, loss, stderr, samples=[2.31, 2.35, 2.29, 2.33])
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        if config is None:
            config = DetectorConfig()
        elif not isinstance(config, DetectorConfig):
            raise TypeError(
                f"`config` must be a DetectorConfig or None, got {config!r}. Pass e.g."
                " InflectionDetector(DetectorConfig(patience=3))."
            )
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget every snapshot and the latch."""
        self._points: list[tuple[float, float, float | None]] = []
        self._terms: list[tuple[float, float | None, float, float | None] | None] = []
        self._samples: list[tuple[float, ...] | None] = []
        self._crossed_at: float | None = None
        self._state = self._compute()

    @property
    def points(self) -> list[tuple[float, float, float | None]]:
        """The snapshots so far, as ``(tokens, value, stderr)``."""
        return list(self._points)

    @property
    def state(self) -> InflectionState:
        """The state after the latest :meth:`update`."""
        return self._state

    def update(
        self,
        tokens: float,
        value: float,
        stderr: float | None = None,
        *,
        base: float | None = None,
        base_stderr: float | None = None,
        sensitivity: float | None = None,
        sensitivity_stderr: float | None = None,
        samples: Sequence[float] | None = None,
    ) -> InflectionState:
        """Add one snapshot and return the new state.

        Crossing is always decided on ``value``; with ``samples`` here and at the bottom,
        the rise is judged on the per-sample differences (see :func:`detect_crossing`). Once
        any snapshot has carried ``base`` and ``sensitivity``, the forecast fits them
        (:func:`fit_forecast_decomposed`) on the snapshots that carry them.

        Args:
            tokens: Tokens seen by the run at this snapshot; strictly more than the last.
            value: The probe signal at ``tokens``.
            stderr: Its standard error; None estimates the noise from the curve.
            base: The signal's falling term (for a perturbed loss: the reference loss).
            base_stderr: Its standard error; None fits the base unweighted.
            sensitivity: The signal's rising term (for a perturbed loss: ``delta``); given
                together with ``base``.
            sensitivity_stderr: Its standard error; None fits the sensitivity unweighted.
            samples: The value of each sample (e.g. each noise direction) at ``tokens``, in
                a fixed order, the same samples at every snapshot; ``value`` is their mean.
                None: no paired test against this snapshot.

        Raises:
            ValueError: On non-increasing or non-positive ``tokens``, a non-finite ``value``,
                ``base`` or ``sensitivity``, a negative or non-finite stderr, only one of
                ``base`` and ``sensitivity``, or fewer than 2 or non-finite ``samples``.
        """
        tokens = check_number(
            "tokens",
            tokens,
            "a finite number > 0",
            "Pass the run's cumulative token count.",
            lambda v: v > 0,
        )
        if self._points and tokens <= self._points[-1][0]:
            raise ValueError(
                f"`tokens` must strictly increase, got {tokens!r} after {self._points[-1][0]!r}."
                " Pass the run's cumulative token count at each snapshot."
            )
        value = check_number(
            "value",
            value,
            "a finite number",
            "Skip a snapshot whose probe failed instead.",
            lambda v: True,
        )
        stderr = _check_stderr("stderr", stderr, "estimate it from the curve")
        terms = _check_terms(base, base_stderr, sensitivity, sensitivity_stderr)
        checked_samples = _check_samples(samples)
        self._points.append((tokens, value, stderr))
        self._terms.append(terms)
        self._samples.append(checked_samples)
        self._state = self._compute()
        return self._state

    def _compute(self) -> InflectionState:
        tokens = [p[0] for p in self._points]
        values = [p[1] for p in self._points]
        stderrs = [p[2] for p in self._points]
        found = detect_crossing(
            tokens,
            values,
            stderrs,
            samples=self._samples,
            patience=self.config.patience,
            min_rise=self.config.min_rise,
            noise_sigmas=self.config.noise_sigmas,
            min_points=self.config.min_points,
        )
        if found.crossed and self._crossed_at is None:
            self._crossed_at = tokens[-1]
        forecast = None
        fit = {"level": self.config.forecast_level, "min_points": self.config.min_points}
        if self.config.forecast and any(self._terms):
            with_terms = [(t, terms) for t, terms in zip(tokens, self._terms) if terms]
            forecast = fit_forecast_decomposed(
                [t for t, _ in with_terms], *zip(*(terms for _, terms in with_terms)), **fit
            )
        elif self.config.forecast:
            forecast = fit_forecast(tokens, values, stderrs, **fit)
        state = InflectionState(
            crossed=self._crossed_at is not None,
            crossed_at_tokens=self._crossed_at,
            bottom_tokens=None if found.bottom_index is None else tokens[found.bottom_index],
            bottom_value=found.bottom_value,
            bottom_stderr=found.bottom_stderr,
            bottom_measured=None if found.bottom_index is None else values[found.bottom_index],
            rise=found.rise,
            rise_threshold=found.rise_threshold,
            consecutive_above=found.consecutive_above,
            forecast_tokens=None if forecast is None else forecast.tokens,
            forecast_low=None if forecast is None else forecast.low,
            forecast_high=None if forecast is None else forecast.high,
            n_points=len(self._points),
            latest_tokens=tokens[-1] if tokens else None,
            latest_value=values[-1] if values else None,
            paired=found.paired,
        )
        if forecast is not None and state.falling:
            forecast = _not_in_the_past(forecast, tokens[-1])
            state = replace(
                state,
                forecast_tokens=None if forecast is None else forecast.tokens,
                forecast_low=None if forecast is None else forecast.low,
                forecast_high=None if forecast is None else forecast.high,
            )
        return state

    def state_dict(self) -> dict[str, Any]:
        """The snapshots (with their terms and samples, None where absent) and the latch, as
        plain values."""
        terms = [t or (None, None, None, None) for t in self._terms]
        return {
            "tokens": [p[0] for p in self._points],
            "values": [p[1] for p in self._points],
            "stderrs": [p[2] for p in self._points],
            **{key: [t[i] for t in terms] for i, key in enumerate(_TERM_KEYS)},
            "samples": [None if x is None else list(x) for x in self._samples],
            "crossed_at_tokens": self._crossed_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; later updates then behave exactly as before saving.

        A state dict from before the terms or the samples existed loads as snapshots
        without them.
        """
        tokens = state_dict.get("tokens", [])
        values = state_dict.get("values", [])
        stderrs = state_dict.get("stderrs", [None] * len(tokens))
        self._points = [(float(t), float(v), s) for t, v, s in zip(tokens, values, stderrs)]
        columns = [state_dict.get(key, [None] * len(tokens)) for key in _TERM_KEYS]
        self._terms = [
            None if b is None else (float(b), bs, float(d), ds) for b, bs, d, ds in zip(*columns)
        ]
        samples = state_dict.get("samples", [None] * len(tokens))
        self._samples = [None if x is None else tuple(float(v) for v in x) for x in samples]
        self._crossed_at = state_dict.get("crossed_at_tokens")
        self._state = self._compute()
