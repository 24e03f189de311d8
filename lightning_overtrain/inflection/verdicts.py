"""The detector's verdicts in words a person can check against the summary table.

Every value quoted is one the table shows (a measured value at a named snapshot), or
is called "smoothed" where it is the detector's median of neighbouring snapshots. A
forecast far beyond the observed tokens is an extrapolation and says so instead of
quoting its number.
"""

from __future__ import annotations

import math
import os
from typing import Any

from lightning_overtrain.inflection.detector import InflectionState

#: A forecast beyond this multiple of the latest snapshot's tokens is not quoted.
FAR_FACTOR = 10.0


def tokens_text(value: Any, infinite: str = "?") -> str:
    """A token count for people: ``tokens_text(1.6e7) == "16M"``."""
    if value == math.inf:
        return infinite
    if not _finite(value):
        return "?"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def value_text(value: Any) -> str:
    """A value as the summary table prints it (4 decimals)."""
    return f"{value:.4f}" if _finite(value) else "?"


def bottom_text(state: InflectionState) -> str:
    """The bottom: where, the value measured there, and the smoothed value the test uses."""
    return (
        f"bottom at {tokens_text(state.bottom_tokens)} tokens (measured"
        f" {value_text(state.bottom_measured)} there; smoothed {value_text(state.bottom_value)}"
        f" ± {value_text(state.bottom_stderr)}, the median of 3 neighbouring snapshots)"
    )


def latest_text(state: InflectionState) -> str:
    """The latest snapshot's value and its rise above the bottom (the bottom snapshot's
    value where the rise was judged paired, else the smoothed bottom)."""
    rise = f"{state.rise:+.4f}" if _finite(state.rise) else "?"
    bottom = "the bottom snapshot (paired)" if state.paired else "the smoothed bottom"
    return (
        f"latest {value_text(state.latest_value)} at {tokens_text(state.latest_tokens)} tokens,"
        f" {rise} from {bottom}"
    )


def crossed_text(signal: str, state: InflectionState) -> str:
    """The crossing in one sentence: the bottom (where, the value measured there), how long
    the curve has stayed above it, and the latest rise against what noise explains."""
    rise = f"{state.rise:+.4f}" if _finite(state.rise) else "?"
    threshold = f"{state.rise_threshold:.3g}" if _finite(state.rise_threshold) else "?"
    # Paired: the rise is from the bottom snapshot; else from the smoothed bottom.
    smoothed = "" if state.paired else f"; smoothed {value_text(state.bottom_value)}"
    return (
        f"{signal} has turned upward: bottom at {tokens_text(state.bottom_tokens)} tokens"
        f" (measured {value_text(state.bottom_measured)} there{smoothed}); above it for"
        f" {state.consecutive_above} snapshots, latest {value_text(state.latest_value)} at"
        f" {tokens_text(state.latest_tokens)} tokens ({rise}, more than the {threshold} that"
        f" {'paired noise' if state.paired else 'noise'} explains)."
    )


def kept_text(best: dict[str, Any] | None) -> str:
    """The kept snapshot in words: which weights ``best.ckpt`` holds, and why.

    Example: ``"Kept: the snapshot at 1.78M tokens (step 435), the bottom of
    finetune/lr=0.001/reference_loss_after so far, in best.ckpt."``
    """
    if not best:
        return "No snapshot is kept (no best signal)."
    step = best.get("step")
    where = f" (step {step})" if _finite(step) else ""
    path = best.get("path")
    into = f", in {os.path.basename(path)}" if path else ""  # the monitor's dirpath
    return (
        f"Kept: the snapshot at {tokens_text(best.get('tokens'))} tokens{where}, the bottom of"
        f" {best.get('signal')} so far{into}."
    )


def far_tokens(value: float | None, latest: float | None) -> bool:
    """Whether ``value`` lies beyond :data:`FAR_FACTOR` x the latest observed tokens."""
    return _finite(value) and _finite(latest) and value > FAR_FACTOR * latest


def _bound_text(value: float | None, latest: float | None, infinite: str) -> str:
    if value is None or value == math.inf:
        return infinite
    if far_tokens(value, latest):
        return f"beyond {FAR_FACTOR:g}x"
    return tokens_text(value)


def forecast_text(state: InflectionState) -> str | None:
    """``T*`` and its interval, or None without a forecast; far ones are not quoted.

    Example: ``"forecast T* = 24M tokens [18M, 40M]"``, or ``"forecast T* beyond 10x
    the observed range (after 160M tokens: an extrapolation) [30M, unbounded]"``.
    """
    tokens, latest = state.forecast_tokens, state.latest_tokens
    if tokens is None or not _finite(tokens):
        return None
    interval = (
        f" [{_bound_text(state.forecast_low, latest, '?')},"
        f" {_bound_text(state.forecast_high, latest, 'unbounded')}]"
    )
    if far_tokens(tokens, latest):
        return (
            f"forecast T* beyond {FAR_FACTOR:g}x the observed range (after"
            f" {tokens_text(FAR_FACTOR * latest)} tokens: an extrapolation){interval}"
        )
    return f"forecast T* = {tokens_text(tokens)} tokens{interval}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
