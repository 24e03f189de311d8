"""The detector's settings, given one way: :class:`DetectorConfig`.

The detector, the policy and the CLI all take one :class:`DetectorConfig`; the
checks here name the setting, the value received and the fix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lightning_overtrain.inflection.crossing import (
    DEFAULT_MIN_POINTS,
    DEFAULT_NOISE_SIGMAS,
    DEFAULT_PATIENCE,
)
from lightning_overtrain.inflection.forecast import DEFAULT_FORECAST_LEVEL


def check_int(name: str, value: Any, minimum: int) -> int:
    fix = f"Pass {name}={minimum} or more."
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r}. {fix}")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}. {fix}")
    return int(value)


def check_number(name: str, value: Any, requirement: str, fix: str, ok: Any) -> float:
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"`{name}` must be a number, got {value!r}. {fix}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number, got {value!r}. {fix}") from None
    if not (math.isfinite(number) and ok(number)):
        raise ValueError(f"`{name}` must be {requirement}, got {number!r}. {fix}")
    return number


@dataclass(frozen=True)
class DetectorConfig:
    """The detector's settings, in one place: the detector, the policy and the CLI read them.

    Args:
        patience: Snapshots in a row that must sit above the bottom to declare a crossing.
        min_rise: Smallest rise above the bottom that counts, in the signal's units.
        noise_sigmas: How many standard errors (of latest minus bottom) the rise must exceed.
        min_points: Snapshots needed before crossing is declared or ``T*`` forecast (the
            forecast needs 6 at least, and without stderrs the noise estimate needs 5).
        forecast: Fit and forecast ``T*`` at every update (about 5-10 ms at 40 points).
        forecast_level: Probability mass of the forecast interval.

    Raises:
        ValueError: On an out-of-range setting, naming it and the fix.
        TypeError: On a setting of the wrong type.

    Example::

        config = DetectorConfig(patience=3, noise_sigmas=2.0)
        InflectionDetector(config=config)
        InflectionPolicy(detector=config)
    """

    patience: int = DEFAULT_PATIENCE
    min_rise: float = 0.0
    noise_sigmas: float = DEFAULT_NOISE_SIGMAS
    min_points: int = DEFAULT_MIN_POINTS
    forecast: bool = True
    forecast_level: float = DEFAULT_FORECAST_LEVEL

    def __post_init__(self) -> None:
        checked = {
            "patience": check_int("patience", self.patience, 1),
            "min_rise": check_number(
                "min_rise",
                self.min_rise,
                "a finite number >= 0",
                "Pass min_rise=0.0 to rely on the noise alone.",
                lambda v: v >= 0,
            ),
            "noise_sigmas": check_number(
                "noise_sigmas",
                self.noise_sigmas,
                "a finite number >= 0",
                f"Pass e.g. noise_sigmas={DEFAULT_NOISE_SIGMAS} (the default).",
                lambda v: v >= 0,
            ),
            "min_points": check_int("min_points", self.min_points, 3),
            "forecast_level": check_number(
                "forecast_level",
                self.forecast_level,
                "strictly between 0 and 1",
                "Pass e.g. forecast_level=0.8 for an 80% interval.",
                lambda v: 0 < v < 1,
            ),
        }
        if not isinstance(self.forecast, bool):
            raise TypeError(f"`forecast` must be a bool, got {self.forecast!r}.")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for ``monitor.json``."""
        return asdict(self)
