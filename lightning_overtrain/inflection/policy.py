"""When to warn or stop: an inflection detector per probe signal, and the user's thresholds.

The policy reads each snapshot's record, feeds every watched signal to its own
:class:`~lightning_overtrain.inflection.detector.InflectionDetector`, and returns the
decisions that fired for the first time (each trigger fires once: an alert is news,
not a heartbeat). It also tracks the snapshot at the bottom of the chosen signal,
the one worth fine-tuning. It holds no Trainer: the monitor acts on its decisions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning_overtrain import keys
from lightning_overtrain.inflection.crossing import DEFAULT_NOISE_SIGMAS
from lightning_overtrain.inflection.detector import InflectionDetector, InflectionState

Action = Literal["warn", "stop"]
ACTIONS = ("warn", "stop")

#: Signals watched by default: the U-shaped curves of the paper.
DEFAULT_SIGNALS = (
    "noise/gamma=*/perturbed_loss",
    "finetune/lr=*/reference_loss_after",
    "finetune/lr=*/downstream_loss_after",
)
#: What each signal's detector adds to the record, under ``inflection/<signal>/``.
INFLECTION_FIELDS = (
    "crossed",
    "bottom_tokens",
    "bottom_value",
    "rise",
    "rise_threshold",
    "forecast_tokens",
    "forecast_low",
    "forecast_high",
)


def key_pattern(glob: str) -> re.Pattern[str]:
    """A metric-key glob as a regex: ``*`` matches within one path part (not ``/``)."""
    return re.compile("".join("[^/]*" if c == "*" else re.escape(c) for c in glob) + r"\Z")


def _matches(patterns: Sequence[re.Pattern[str]], key: str) -> bool:
    return any(p.match(key) for p in patterns)


@dataclass(frozen=True)
class Decision:
    """A trigger that fired: what to do, and why, in words and numbers."""

    signal: str
    trigger: Literal["crossed", "forecast", "threshold"]
    action: Action
    tokens: float
    message: str


class InflectionPolicy:
    """Detect the inflection of each watched signal and decide to warn or stop.

    Args:
        signals: record keys (or globs, ``*`` within one path part) of the curves to
            watch for a U: by default the perturbed loss per gamma and the
            post-fine-tune reference and downstream losses per lr.
        action: what a trigger does by default: ``"warn"`` (log, console, alert
            hooks; the default) or ``"stop"`` (``trainer.should_stop``, agreed by all ranks).
        actions: per-signal (or per-threshold-key) overrides, ``{glob: action}``.
        patience: snapshots a curve must stay above its bottom before it counts as crossed.
        min_rise: the least rise above the bottom that counts, in the signal's units.
        noise_sigmas: how many standard errors of noise a rise must exceed.
        forecast_margin: also trigger when the forecast ``T*`` lies within this
            fraction of the current tokens ahead (``T* <= T * (1 + margin)``); None: off.
        thresholds: ``{key or glob: limit}``: trigger when a record's value exceeds the
            limit, e.g. ``{"noise/gamma=1/relative_delta": 0.05}``.
        best_signal: the curve whose bottom marks the snapshot worth fine-tuning;
            ``"auto"`` picks the post-fine-tune reference loss at the largest lr, else the
            perturbed loss at the largest gamma; None keeps no best snapshot.

    Raises:
        ValueError: on a bad argument (named, with the value and the fix).

    Example::

        policy = InflectionPolicy(
            action="warn",
            actions={"noise/gamma=1/perturbed_loss": "stop"},
            thresholds={"noise/gamma=1/relative_delta": 0.05},
        )
        monitor = OvertrainingMonitor(reference_data=..., points_per_decade=4,
                                      start_tokens=10**7, policy=policy)
    """

    def __init__(
        self,
        signals: Sequence[str] = DEFAULT_SIGNALS,
        action: Action = "warn",
        actions: Mapping[str, Action] | None = None,
        patience: int = 2,
        min_rise: float = 0.0,
        noise_sigmas: float = DEFAULT_NOISE_SIGMAS,
        forecast_margin: float | None = None,
        thresholds: Mapping[str, float] | None = None,
        best_signal: str | None = "auto",
    ) -> None:
        if isinstance(signals, str) or not all(isinstance(s, str) and s for s in signals):
            raise ValueError(
                f"`signals` must be a list of record keys or globs, got {signals!r}."
                " Pass e.g. signals=['noise/gamma=*/perturbed_loss']."
            )
        actions = dict(actions or {})
        named = [("action", action), *((f"actions[{k!r}]", v) for k, v in actions.items())]
        for where, value in named:
            if value not in ACTIONS:
                raise ValueError(f"`{where}` must be 'warn' or 'stop', got {value!r}.")
        if forecast_margin is not None and not (
            isinstance(forecast_margin, (int, float)) and forecast_margin >= 0
        ):
            raise ValueError(
                f"`forecast_margin` must be a number >= 0 or None, got {forecast_margin!r}."
                " Pass e.g. 0.5 to act when T* is less than 1.5x the current tokens away."
            )
        thresholds = dict(thresholds or {})
        for key, limit in thresholds.items():
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or math.isnan(limit):
                raise ValueError(
                    f"`thresholds[{key!r}]` must be a number, got {limit!r}."
                    " Pass the value above which to act, e.g. {'noise/gamma=1/delta': 0.5}."
                )
        if best_signal is not None and not (isinstance(best_signal, str) and best_signal):
            raise ValueError(
                f"`best_signal` must be a record key, 'auto' or None, got {best_signal!r}."
            )
        # Built once to validate patience, min_rise and noise_sigmas with the detector's messages.
        InflectionDetector(patience=patience, min_rise=min_rise, noise_sigmas=noise_sigmas)

        self.signals = tuple(signals)
        self.action: Action = action
        self.actions = actions
        self.patience, self.min_rise, self.noise_sigmas = patience, min_rise, noise_sigmas
        self.forecast_margin = forecast_margin
        self.thresholds = thresholds
        self.best_signal = best_signal
        self._signal_patterns = [key_pattern(s) for s in self.signals]
        self._action_patterns = [(key_pattern(k), v) for k, v in actions.items()]
        self._threshold_patterns = [(key_pattern(k), v) for k, v in thresholds.items()]

        self.detectors: dict[str, InflectionDetector] = {}
        self.fired: set[str] = set()
        self.best: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "signals": list(self.signals),
            "action": self.action,
            "actions": dict(self.actions),
            "patience": self.patience,
            "min_rise": self.min_rise,
            "noise_sigmas": self.noise_sigmas,
            "forecast_margin": self.forecast_margin,
            "thresholds": dict(self.thresholds),
            "best_signal": self.best_signal,
        }

    def action_for(self, key: str) -> Action:
        for pattern, action in self._action_patterns:
            if pattern.match(key):
                return action
        return self.action

    def update(self, record: Mapping[str, float]) -> tuple[dict[str, float], list[Decision]]:
        """Read one snapshot's record.

        Returns:
            The ``inflection/<signal>/...`` values to add to the record, and the
            decisions that fired for the first time at this snapshot.
        """
        tokens = float(record[keys.TOKENS])
        additions: dict[str, float] = {}
        decisions: list[Decision] = []
        for signal, value in record.items():
            if not _matches(self._signal_patterns, signal) or not _finite(value):
                continue
            state = self._detector(signal).update(
                tokens, value, _stderr(record, signal), **decomposed_terms(record, signal)
            )
            fields = state.to_dict()
            for field in INFLECTION_FIELDS:
                additions[keys.inflection_key(signal, field)] = fields[field]
            decisions += self._inflection_decisions(signal, state, tokens)
        decisions += self._threshold_decisions(record, tokens)
        return additions, decisions

    def _detector(self, signal: str) -> InflectionDetector:
        if signal not in self.detectors:
            self.detectors[signal] = InflectionDetector(
                patience=self.patience, min_rise=self.min_rise, noise_sigmas=self.noise_sigmas
            )
        return self.detectors[signal]

    def _fire(self, key: str, decision: Decision) -> list[Decision]:
        if key in self.fired:
            return []
        self.fired.add(key)
        return [decision]

    def _inflection_decisions(
        self, signal: str, state: InflectionState, tokens: float
    ) -> list[Decision]:
        out: list[Decision] = []
        action = self.action_for(signal)
        if state.crossed:
            out += self._fire(
                f"crossed:{signal}",
                Decision(
                    signal,
                    "crossed",
                    action,
                    tokens,
                    f"{signal} has turned upward: its bottom was {state.bottom_value:.4g} at"
                    f" {state.bottom_tokens:,.0f} tokens and it has stayed above it for"
                    f" {state.consecutive_above} snapshots (now {state.rise:+.4g},"
                    f" more than the {state.rise_threshold:.3g} that noise explains).",
                ),
            )
        forecast = state.forecast_tokens
        if (
            self.forecast_margin is not None
            and forecast is not None
            and math.isfinite(forecast)
            and forecast <= tokens * (1 + self.forecast_margin)
        ):
            out += self._fire(
                f"forecast:{signal}",
                Decision(
                    signal,
                    "forecast",
                    action,
                    tokens,
                    f"{signal} is forecast to turn upward at {forecast:,.0f} tokens (interval"
                    f" {_fmt(state.forecast_low)} to {_fmt(state.forecast_high)}), within"
                    f" {self.forecast_margin:.0%} of the current {tokens:,.0f} tokens.",
                ),
            )
        return out

    def _threshold_decisions(self, record: Mapping[str, float], tokens: float) -> list[Decision]:
        out: list[Decision] = []
        for key, value in record.items():
            for pattern, limit in self._threshold_patterns:
                if pattern.match(key) and _finite(value) and value > limit:
                    out += self._fire(
                        f"threshold:{key}",
                        Decision(
                            key,
                            "threshold",
                            self.action_for(key),
                            tokens,
                            f"{key} = {value:.4g} exceeds its threshold {limit:.4g}.",
                        ),
                    )
        return out

    def best_candidate(self, record: Mapping[str, float]) -> tuple[str, float] | None:
        """The best signal's value if this record is its new minimum, else None."""
        signal = self._resolve_best_signal(record)
        if signal is None or not _finite(record.get(signal)):
            return None
        value = float(record[signal])
        if self.best is not None and self.best["signal"] == signal and value >= self.best["value"]:
            return None
        return signal, value

    def _resolve_best_signal(self, record: Mapping[str, float]) -> str | None:
        if self.best_signal != "auto":
            return self.best_signal
        if self.best is not None:
            return self.best["signal"]
        for glob, number in (
            ("finetune/lr=*/reference_loss_after", r"finetune/lr=([^/]+)/"),
            ("noise/gamma=*/perturbed_loss", r"noise/gamma=([^/]+)/"),
        ):
            pattern = key_pattern(glob)
            names = [k for k in record if pattern.match(k)]
            if names:
                return max(names, key=lambda k: _number_in(number, k))
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "detectors": {s: d.state_dict() for s, d in self.detectors.items()},
            "fired": sorted(self.fired),
            "best": dict(self.best) if self.best is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.detectors = {}
        for signal, detector_state in state.get("detectors", {}).items():
            self._detector(signal).load_state_dict(detector_state)
        self.fired = set(state.get("fired", []))
        best = state.get("best")
        self.best = dict(best) if best is not None else None


#: A U-shaped signal and its rising term: ``signal = reference_loss + term``.
_RISING_TERMS = {"/perturbed_loss": "/delta", "/reference_loss_after": "/forgetting"}


def decomposed_terms(record: Mapping[str, float], signal: str) -> dict[str, float | None]:
    """The paper's two terms of ``signal``, for the detector's forecast, when the record has them.

    A perturbed loss is ``reference_loss + delta`` and a post-fine-tune reference loss is
    ``reference_loss + forgetting``: the falling base and the rising sensitivity are
    measured separately, and fitting each on its own forecasts ``T*`` far better than
    fitting their noisy sum (``benchmarks/detector_validation.py``).
    """
    for suffix, term in _RISING_TERMS.items():
        if signal.endswith(suffix):
            rising = signal[: -len(suffix)] + term
            base, sensitivity = record.get(keys.REFERENCE_LOSS), record.get(rising)
            if _finite(base) and _finite(sensitivity):
                return {
                    "base": float(base),
                    "sensitivity": float(sensitivity),
                    "sensitivity_stderr": _stderr(record, rising),
                }
    return {}


def _stderr(record: Mapping[str, float], signal: str) -> float | None:
    value = record.get(f"{signal}_stderr")
    return float(value) if _finite(value) and value >= 0 else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_in(pattern: str, key: str) -> float:
    match = re.match(pattern, key)
    return float(match.group(1)) if match else -math.inf


def _fmt(value: float | None) -> str:
    return "never" if value is None or not math.isfinite(value) else f"{value:,.0f}"
