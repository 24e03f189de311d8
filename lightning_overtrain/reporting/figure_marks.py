"""The detector's marks on a curve: its bottom ring and its forecast, as the console says them.

A figure must tell the same story as the console line
(:func:`~lightning_overtrain.reporting.console.format_snapshot`) and the verdicts
(:mod:`~lightning_overtrain.inflection.verdicts`), in the same words:

- a **ring** at a real bottom (see :func:`real_bottom`): open while it is only the
  lowest point so far, half filled once the latest snapshot is *rising above its
  bottom* by more than the noise, filled once *crossed* (the console's "TURNED UP");
- the **forecast** ``T*`` only where the console would quote it: not crossed yet and
  ahead of the latest snapshot. A forecast beyond
  :data:`~lightning_overtrain.inflection.verdicts.FAR_FACTOR` x the observed tokens is
  an extrapolation: no number, as the console says it. An interval open above runs to
  the axis edge and ends in an arrow, never in "inf".

The tokens axis is fitted to the data first, so a mark past it is written at its edge
with an arrow and never stretches it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_overtrain import keys
from lightning_overtrain.reporting import figure_style as style

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Records = Sequence[Mapping[str, Any]]


def finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number, NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _positive(value: Any) -> float | None:
    value = finite(value)
    return value if value is not None and value > 0 else None


@dataclass(frozen=True)
class Inflection:
    """The detector's latest view of one signal (None where it has not said).

    ``forecast_high`` is None when the interval is unbounded above. ``rising``: the
    latest snapshot sits above the bottom by more than the noise threshold, the
    detector's patience not passed yet (the console's "rising above its bottom").
    """

    crossed: bool
    bottom_tokens: float | None
    forecast_tokens: float | None
    forecast_low: float | None
    forecast_high: float | None
    rising: bool = False

    @property
    def state(self) -> str:
        """The bottom's state, a key of :data:`~.figure_style.BOTTOM_STATES`."""
        return "crossed" if self.crossed else "rising" if self.rising else "lowest"


def inflection(records: Records, signal: str) -> Inflection | None:
    """The latest ``inflection/<signal>/...`` values in ``records``, or None if there are none.

    A missing or infinite ``forecast_high`` ("it may never turn up") reads as None.
    """
    for record in reversed(records):
        fields = {f: record.get(keys.inflection_key(signal, f)) for f in keys.INFLECTION_FIELDS}
        if all(v is None for v in fields.values()):
            continue
        rise, threshold = finite(fields["rise"]), finite(fields["rise_threshold"])
        crossed = bool(finite(fields["crossed"]))
        return Inflection(
            crossed=crossed,
            bottom_tokens=_positive(fields["bottom_tokens"]),
            forecast_tokens=_positive(fields["forecast_tokens"]),
            forecast_low=_positive(fields["forecast_low"]),
            forecast_high=_positive(fields["forecast_high"]),
            rising=not crossed and rise is not None and threshold is not None and rise > threshold,
        )
    return None


def real_bottom(tokens: Sequence[float], mark: Inflection | None) -> int | None:
    """The index in ``tokens`` of the detector's bottom, if it is a real one; else None.

    A real bottom is a measured snapshot with snapshots on both sides: the detector's
    minimum of a curve still falling (its last point) or only rising (its first) is an
    end of the curve, not a bottom, and gets no ring.

    Example::

        real_bottom([1e5, 1e6, 1e7], inflection(records, "noise/gamma=1/perturbed_loss"))
    """
    if mark is None or mark.bottom_tokens is None or not tokens:
        return None
    bottom = mark.bottom_tokens
    i = min(range(len(tokens)), key=lambda j: abs(math.log(tokens[j] / bottom)))
    on_a_snapshot = abs(math.log(tokens[i] / bottom)) < 0.01
    return i if on_a_snapshot and 0 < i < len(tokens) - 1 else None


def draw_marks(
    ax: Axes,
    tokens: Sequence[float],
    values: Sequence[float],
    mark: Inflection | None,
    label: str,
    color: Any,
) -> set[str]:
    """Draw one curve's ring and forecast on ``ax`` (its x-axis already fitted).

    Returns:
        The kinds of mark drawn (keys of :data:`~.figure_style.MARK_LABELS`).
    """
    if mark is None:
        return set()
    kinds: set[str] = set()
    if (i := real_bottom(tokens, mark)) is not None:
        style.ring(ax, tokens[i], values[i], color, mark.state)
        kinds.add(f"bottom:{mark.state}")
    t, latest = mark.forecast_tokens, max(tokens)
    # As the console: a turn already measured, or forecast in the past, is not forecast.
    if mark.crossed or t is None or t <= latest:
        return kinds
    return kinds | _draw_forecast(
        ax, t, mark.forecast_low, mark.forecast_high, latest, label, color
    )


def _draw_forecast(
    ax: Axes,
    t: float,
    low: float | None,
    high: float | None,
    latest: float,
    label: str,
    color: Any,
) -> set[str]:
    from lightning_overtrain.inflection.verdicts import FAR_FACTOR, far_tokens

    if far_tokens(t, latest):  # an extrapolation: no date, as the console says it
        style.mark_beyond(ax, f"{label}: T* beyond {FAR_FACTOR:g}x the observed tokens", color)
        return set()
    right = ax.get_xlim()[1]

    def text(value: float) -> str:
        return style.bound_text(value, latest)

    interval = (
        "" if low is None else f" [{text(low)}, {'open above' if high is None else text(high)}]"
    )
    if t > right:
        style.mark_beyond(ax, f"{label}: T* {text(t)}{interval}", color)
        return set()
    kinds = {"forecast"}
    ax.axvline(t, color=color, linestyle="--", linewidth=1.3, zorder=2)
    if low is not None and (start := max(low, ax.get_xlim()[0])) < (
        end := min(high or right, right)
    ):
        ax.axvspan(start, end, color=color, alpha=0.08, zorder=0)
        kinds.add("interval")
    if low is not None and (high is None or high > right):
        to = "open above" if high is None else text(high)
        style.mark_beyond(ax, f"{label}: T* interval runs past the axis ({to})", color)
    return kinds
