"""Bottoms and leads with intervals: the statistics of ``reproduce_analysis.py``.

A bottom is a fitted minimum, never the argmin of a noisy curve: a parabola in
``log2(tokens)`` through the lowest point and its two neighbours on each side; its
vertex is the bottom. Its interval comes from replicate curves: for the noise probe,
the directions resampled with replacement (the same resample at every snapshot, as
the directions are common random numbers), plus for every curve its own
snapshot-to-snapshot jitter (the spread of third differences, which a locally
quadratic curve does not have) added back as independent noise. Each replicate is
fitted the same way; the interval is the 5th to 95th percentile of the replicate
vertices (a 90% interval).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

REPLICATES = 400
LEVEL = (5.0, 95.0)  # percentiles of a 90% interval


def fitted_bottom(x: np.ndarray, y: np.ndarray) -> tuple[float, bool]:
    """The vertex of a parabola through the lowest point of ``y`` and up to two neighbours a side.

    Args:
        x: ``log2(tokens)``, increasing.
        y: the curve (NaN where not measured).

    Returns:
        ``(x at the bottom, interior)``: ``interior`` is False when the lowest point is
        the first or last one (the curve has not turned within the run); the bottom is
        then that point, a bound rather than an estimate.
    """
    finite = np.isfinite(y)
    x, y = x[finite], y[finite]
    j = int(np.argmin(y))
    if j in (0, len(y) - 1):
        return float(x[j]), False
    lo, hi = max(0, j - 2), min(len(y), j + 3)
    a, b, _ = np.polyfit(x[lo:hi], y[lo:hi], 2)
    vertex = -b / (2 * a) if a > 0 else x[j]
    return float(np.clip(vertex, x[j - 1], x[j + 1])), True


def jitter(y: np.ndarray) -> float:
    """A curve's snapshot-to-snapshot noise, from its third differences.

    A parabola (the curve near its bottom, in log tokens) has none, so what is left is
    noise, plus any sharper bend, which only widens the intervals.
    """
    y = y[np.isfinite(y)]
    if len(y) < 4:
        return 0.0
    d3 = y[3:] - 3 * y[2:-1] + 3 * y[1:-2] - y[:-3]
    return float(np.sqrt(np.mean(d3**2) / 20))  # var(d3) = 20 var(y) for independent noise


def replicates(
    y: np.ndarray, directions: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    """``REPLICATES`` curves as noisy as ``y``: directions resampled (if any), its jitter added.

    Args:
        y: the curve over snapshots.
        directions: ``[direction, snapshot]`` values whose mean is ``y`` (None: none).
        rng: the generator.
    """
    base = np.broadcast_to(y, (REPLICATES, len(y)))
    if directions is not None and len(directions) > 1:
        n = len(directions)
        picks = rng.integers(0, n, size=(REPLICATES, n))
        # The bootstrap's spread is (n - 1) / n of the sampling variance: undo that shrink.
        base = y + math.sqrt(n / (n - 1)) * (directions[picks].mean(axis=1) - y)
    return base + rng.normal(0.0, jitter(y), size=(REPLICATES, len(y)))


def bottom_with_interval(
    x: np.ndarray, y: np.ndarray, directions: np.ndarray | None, rng: np.random.Generator
) -> dict[str, float | bool]:
    """The fitted bottom of one curve, its 90% interval, and how often replicates turn.

    Returns:
        ``log2_tokens`` (the bottom), ``low``/``high`` (the interval), ``interior``
        (the curve itself turned), ``interior_fraction`` (of the replicates), and
        ``edge`` (``"last"``: still falling at the end, the bottom is later; ``"first"``:
        rising from the start, it is earlier; None: it turned), and ``samples``, the
        replicate bottoms (for leads; dropped before publishing).
    """
    at, interior = fitted_bottom(x, y)
    known = x[np.isfinite(y)]
    fits = [fitted_bottom(x, r) for r in replicates(y, directions, rng)]
    samples = np.array([at for at, _ in fits])
    turned = np.mean([turned for _, turned in fits])
    low, high = np.percentile(samples, LEVEL)
    return {
        "log2_tokens": at,
        "low": float(low),
        "high": float(high),
        "interior": interior,
        # A curve that never turned: still falling at its last snapshot, or rising from its first.
        "edge": None if interior else ("last" if at == known[-1] else "first"),
        "interior_fraction": float(turned),
        "samples": samples,
    }


def lead_with_interval(cheap: dict, expensive: dict, step: float) -> dict[str, float | bool]:
    """How far ``cheap``'s bottom precedes ``expensive``'s, in snapshots and as a token factor.

    Args:
        cheap: :func:`bottom_with_interval` of the early signal.
        expensive: the same, of the signal it should foresee.
        step: ``log2`` of the snapshot ratio.

    Returns:
        ``snapshots`` (positive: ``cheap`` bottoms first), its 90% interval, the same as a
        factor in tokens; ``lower_bound``: ``expensive`` was still falling at the end, so
        the lead is at least what is shown; ``upper_bound``: ``cheap`` was, so it is at
        most that (both: no lead can be said).
    """
    diff = expensive["samples"] - cheap["samples"]
    lead = expensive["log2_tokens"] - cheap["log2_tokens"]
    low, high = np.percentile(diff, LEVEL)
    return {
        "snapshots": lead / step,
        "snapshots_low": float(low / step),
        "snapshots_high": float(high / step),
        "token_factor": 2.0**lead,
        "token_factor_low": float(2.0**low),
        "token_factor_high": float(2.0**high),
        "lower_bound": expensive["edge"] == "last",
        "upper_bound": cheap["edge"] == "last",
        "cheap_turned": bool(cheap["interior"]),
    }


def pooled(values: Sequence[np.ndarray], point: Sequence[float], rng: np.random.Generator) -> dict:
    """The mean over seeds of a per-seed quantity, with a 90% interval.

    The bootstrap resamples seeds and, within each, one of its replicates, so the
    interval carries both the spread across seeds and each seed's own uncertainty.

    Args:
        values: per seed, its replicate values.
        point: per seed, its estimate.
        rng: the generator.
    """
    n = len(values)
    seeds = rng.integers(0, n, size=(REPLICATES, n))
    picks = rng.integers(0, min(len(v) for v in values), size=(REPLICATES, n))
    stacked = np.array([v[: min(len(w) for w in values)] for v in values])
    draws = stacked[seeds, picks].mean(axis=1)
    low, high = np.percentile(draws, LEVEL)
    return {"mean": float(np.mean(point)), "low": float(low), "high": float(high), "seeds": n}


def slope_per_doubling(x: np.ndarray, y: np.ndarray) -> float:
    """The least-squares slope of ``y`` against ``log2(tokens)``: change per doubling."""
    finite = np.isfinite(y)
    return float(np.polyfit(x[finite], y[finite], 1)[0]) if finite.sum() >= 2 else math.nan
