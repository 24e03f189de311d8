"""When to warn or stop: an inflection detector per probe signal, and the user's thresholds.

:meth:`InflectionPolicy.judge` reads each snapshot's record, feeds every watched
signal (by default: every U-shaped signal the probes declare) to its own
:class:`~lightning_overtrain.inflection.detector.InflectionDetector`, and returns the
verdicts, the fields to add to the record, the decisions that fired for the first
time (each trigger fires once: an alert is news, not a heartbeat) and whether the
best snapshot (the bottom of the chosen signal, the one worth fine-tuning) moved.
It holds no Trainer: the monitor and ``lightning-overtrain report`` both call it and
act on what it returns.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning_overtrain import keys
from lightning_overtrain.inflection.config import DetectorConfig
from lightning_overtrain.inflection.detector import InflectionDetector, InflectionState
from lightning_overtrain.inflection.signals import (
    decomposed_terms,
    finite,
    samples_of,
    stderr_of,
)
from lightning_overtrain.inflection.verdicts import (
    crossed_text,
    forecast_text,
    kept_text,
    latest_text,
)
from lightning_overtrain.keys import Signal

Action = Literal["warn", "stop"]
ACTIONS = ("warn", "stop")


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


@dataclass(frozen=True)
class Judgement:
    """What :meth:`InflectionPolicy.judge` made of one snapshot's record.

    Attributes:
        additions: the fields to add to the record: ``inflection/<signal>/...`` per
            watched signal, and ``best/tokens``, ``best/value`` once there is a best.
        decisions: the triggers that fired for the first time at this snapshot.
        verdicts: the detector's state per watched signal in this record.
        best_moved: this snapshot is the new best (keep its weights now).
        best: the best snapshot so far (``signal``, ``value``, ``tokens``, ``step``,
            ``path``), or None; the same dict as ``policy.best``.
    """

    additions: dict[str, float]
    decisions: list[Decision]
    verdicts: dict[str, InflectionState]
    best_moved: bool
    best: dict[str, Any] | None


class InflectionPolicy:
    """Detect the inflection of each watched signal and decide to warn or stop.

    Args:
        signals: record keys (or globs, ``*`` within one path part) of the curves to
            watch for a U; None (the default): every signal the probes declare
            ``u_shaped`` (:meth:`declare`; the built-in probes' keys are recognised in
            any record, e.g. the perturbed loss per gamma and the post-fine-tune
            reference and downstream losses per lr of every fine-tune probe).
        action: what a trigger does by default: ``"warn"`` (log, console, alert
            hooks; the default) or ``"stop"`` (``trainer.should_stop``, agreed by all ranks).
        actions: per-signal (or per-threshold-key) overrides, ``{glob: action}``.
        forecast_margin: also trigger when the forecast ``T*`` lies within this
            fraction of the current tokens ahead (``T* <= T * (1 + margin)``) and its
            interval is bounded ("never turns up" ruled out); None: off.
        thresholds: ``{key or glob: limit}``: trigger when a record's value exceeds the
            limit, e.g. ``{"noise/gamma=1/relative_delta": 0.05}``.
        best_signal: the curve whose bottom marks the snapshot worth fine-tuning;
            ``"auto"``: the U-shaped signal of highest ``rank`` (the post-fine-tune
            reference loss at the largest lr, else the perturbed loss at the largest
            gamma, else a probe's own); None keeps no best snapshot.
        detector: the detector settings (``patience``, ``noise_sigmas``, ...), as one
            :class:`~lightning_overtrain.inflection.config.DetectorConfig` (or its dict);
            None: the defaults.

    Raises:
        ValueError: on a bad argument (named, with the value and the fix).

    Example::

        policy = InflectionPolicy(
            action="warn",
            actions={"noise/gamma=1/perturbed_loss": "stop"},
            thresholds={"noise/gamma=1/relative_delta": 0.05},
            detector=DetectorConfig(patience=2),
        )
        monitor = OvertrainingMonitor(reference_data=..., points_per_decade=4,
                                      start_tokens=10**7, policy=policy)
    """

    def __init__(
        self,
        signals: Sequence[str] | None = None,
        action: Action = "warn",
        actions: Mapping[str, Action] | None = None,
        forecast_margin: float | None = None,
        thresholds: Mapping[str, float] | None = None,
        best_signal: str | None = "auto",
        detector: DetectorConfig | Mapping[str, Any] | None = None,
    ) -> None:
        if signals is not None and (
            isinstance(signals, str) or not all(isinstance(s, str) and s for s in signals)
        ):
            raise ValueError(
                f"`signals` must be a list of record keys or globs, or None, got {signals!r}."
                " Pass e.g. signals=['noise/gamma=*/perturbed_loss'], or None for the"
                " probes' U-shaped signals."
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
        self.detector_config = _detector_config(detector)
        self.signals = None if signals is None else tuple(signals)
        self.action: Action = action
        self.actions = actions
        self.forecast_margin = forecast_margin
        self.thresholds = thresholds
        self.best_signal = best_signal
        self._signal_patterns = [keys.key_pattern(s) for s in self.signals or ()]
        self._action_patterns = [(keys.key_pattern(k), v) for k, v in actions.items()]
        self._threshold_patterns = [(keys.key_pattern(k), v) for k, v in thresholds.items()]
        self.declared: dict[str, Signal] = {}

        self.detectors: dict[str, InflectionDetector] = {}
        self.fired: set[str] = set()
        self.best: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> InflectionPolicy:
        """The policy of :meth:`config` (a run's ``monitor.json``), older layouts included.

        A config written before the detector settings moved into ``detector`` (with
        ``patience``, ``min_rise`` and ``noise_sigmas`` at the top) loads with them there.

        Raises:
            ValueError: on a bad setting, as the constructor.
        """
        config = dict(config)
        moved = {k: config.pop(k) for k in _FLAT_DETECTOR_SETTINGS if k in config}
        moved = {k: v for k, v in moved.items() if v is not None}
        if moved:
            config["detector"] = {**dict(config.get("detector") or {}), **moved}
        return cls(**config)

    def config(self) -> dict[str, Any]:
        return {
            "signals": None if self.signals is None else list(self.signals),
            "action": self.action,
            "actions": dict(self.actions),
            "forecast_margin": self.forecast_margin,
            "thresholds": dict(self.thresholds),
            "best_signal": self.best_signal,
            "detector": self.detector_config.to_dict(),
        }

    def declare(self, signals: Sequence[Signal]) -> None:
        """Take the probes' declarations: what to watch by default, each signal's terms,
        its stderr and samples, and the candidates for the best snapshot. The monitor
        calls it before training; a key nobody declared is judged only when ``signals``
        names it, as a plain curve."""
        self.declared = {s.key: s for s in signals}

    def action_for(self, key: str) -> Action:
        for pattern, action in self._action_patterns:
            if pattern.match(key):
                return action
        return self.action

    def judge(self, record: Mapping[str, float], best_path: str | None = None) -> Judgement:
        """Read one snapshot's record: verdicts, the fields to add, decisions, the best snapshot.

        Feeds every watched signal to its detector, fires each trigger once, and moves
        :attr:`best` (with ``path=best_path``) when this record is the best signal's new
        minimum. The record itself is left as it is.

        Args:
            record: the snapshot's record (with ``tokens``; ``step`` if known).
            best_path: where the caller keeps the best snapshot's weights.

        Raises:
            ValueError: from the detector, e.g. on tokens that do not increase.
        """
        tokens = float(record[keys.TOKENS])
        declared = self.declared
        additions: dict[str, float] = {}
        decisions: list[Decision] = []
        verdicts: dict[str, InflectionState] = {}
        moved = self._move_best(record, declared, best_path)  # the decisions name the kept one
        for key, value in record.items():
            if not self._watches(key, declared) or not finite(value):
                continue
            signal = declared.get(key) or Signal(key)
            state = self._detector(key).update(
                tokens,
                value,
                stderr_of(record, signal.stderr),
                **decomposed_terms(record, signal),
                samples=samples_of(record, signal),
            )
            verdicts[key] = state
            fields = state.to_dict()
            for field in keys.INFLECTION_FIELDS:
                additions[keys.inflection_key(key, field)] = fields[field]
            decisions += self._inflection_decisions(key, state, tokens)
        decisions += self._threshold_decisions(record, tokens)
        if self.best is not None:
            additions[keys.BEST_TOKENS] = self.best["tokens"]
            additions[keys.BEST_VALUE] = self.best["value"]
        return Judgement(additions, decisions, verdicts, moved, self.best)

    def _watches(self, key: str, declared: Mapping[str, Signal]) -> bool:
        if self.signals is None:
            return key in declared and declared[key].u_shaped
        return _matches(self._signal_patterns, key)

    def _detector(self, signal: str) -> InflectionDetector:
        if signal not in self.detectors:
            self.detectors[signal] = InflectionDetector(config=self.detector_config)
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
                    crossed_text(signal, state) + " " + kept_text(self.best),
                ),
            )
        forecast = state.forecast_tokens
        if (
            self.forecast_margin is not None
            and forecast is not None
            and math.isfinite(forecast)
            and forecast <= tokens * (1 + self.forecast_margin)
            # An unbounded interval leaves "never turns up" plausible: no turn in sight.
            and state.forecast_high is not None
            and math.isfinite(state.forecast_high)
        ):
            out += self._fire(
                f"forecast:{signal}",
                Decision(
                    signal,
                    "forecast",
                    action,
                    tokens,
                    f"{signal}: {forecast_text(state)}, within {self.forecast_margin:.0%} of"
                    f" the current {tokens:,.0f} tokens ({latest_text(state)}).",
                ),
            )
        return out

    def _threshold_decisions(self, record: Mapping[str, float], tokens: float) -> list[Decision]:
        out: list[Decision] = []
        for key, value in record.items():
            for pattern, limit in self._threshold_patterns:
                if pattern.match(key) and finite(value) and value > limit:
                    out += self._fire(
                        f"threshold:{key}",
                        Decision(
                            key,
                            "threshold",
                            self.action_for(key),
                            tokens,
                            f"{key} = {value:.4g} exceeds its threshold {limit:.4g} (at"
                            f" {tokens:,.0f} tokens).",
                        ),
                    )
        return out

    def _move_best(
        self, record: Mapping[str, float], declared: Mapping[str, Signal], path: str | None
    ) -> bool:
        signal = self._best_signal(record, declared)
        if signal is None or not finite(record.get(signal)):
            return False
        value = float(record[signal])
        if self.best is not None and self.best["signal"] == signal and value >= self.best["value"]:
            return False
        self.best = {
            "signal": signal,
            "value": value,
            "tokens": record[keys.TOKENS],
            "step": record.get(keys.STEP),
            "path": path,
        }
        return True

    def _best_signal(
        self, record: Mapping[str, float], declared: Mapping[str, Signal]
    ) -> str | None:
        if self.best_signal != "auto":
            return self.best_signal
        if self.best is not None:
            return self.best["signal"]
        candidates = [
            (s.rank, -i, s.key)
            for i, s in enumerate(declared.values())
            if s.u_shaped and s.rank is not None and finite(record.get(s.key))
        ]
        return max(candidates)[2] if candidates else None

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


_FLAT_DETECTOR_SETTINGS = ("patience", "min_rise", "noise_sigmas")


def _detector_config(detector: DetectorConfig | Mapping[str, Any] | None) -> DetectorConfig:
    if detector is None:
        return DetectorConfig()
    if isinstance(detector, DetectorConfig):
        return detector
    if isinstance(detector, Mapping):
        return DetectorConfig(**detector)
    raise ValueError(
        f"`detector` must be a DetectorConfig, a dict or None, got {detector!r}. Pass e.g."
        " detector=DetectorConfig(patience=3)."
    )
