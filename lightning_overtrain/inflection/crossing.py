"""Has a probe signal turned upward? The crossing test and its noise estimate.

:func:`detect_crossing` asks whether the bottom of ``y(T)`` is in the past, with the
latest values above it by more than the noise and ``min_rise``, for ``patience``
snapshots in a row. The defaults (3 standard errors, patience 2, 6 points) were tuned
on synthetic curves (:mod:`lightning_overtrain.testing.synthetic`) with seeds apart
from the reported ones; ``benchmarks/detector_validation.py`` measures them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_PATIENCE = 2
DEFAULT_NOISE_SIGMAS = 3.0
DEFAULT_MIN_POINTS = 6
_MEDIAN_OF_3_SD = 0.670  # std of the median of three iid N(0, 1) draws
_MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class Crossing:
    """What :func:`detect_crossing` found (None where there are no points yet)."""

    crossed: bool
    bottom_index: int | None
    bottom_value: float | None
    bottom_stderr: float | None
    rise: float | None
    rise_threshold: float | None
    consecutive_above: int
    paired: bool = False  # the latest rise was judged on paired differences


def _as_arrays(
    tokens: Sequence[float],
    values: Sequence[float],
    stderrs: Sequence[float | None] | None,
    names: tuple[str, str] = ("values", "stderrs"),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Missing stderrs become NaN. `names` are the caller's argument names, for the errors.
    t = np.asarray(tokens, dtype=float)
    y = np.asarray(values, dtype=float)
    s = np.full_like(y, np.nan)
    if stderrs is not None:
        s = np.array([np.nan if v is None else v for v in stderrs], dtype=float)
    if t.ndim != 1 or not t.shape == y.shape == s.shape:
        raise ValueError(
            f"`tokens`, `{names[0]}` and `{names[1]}` must be 1-D and of one length, got"
            f" shapes {t.shape}, {y.shape}, {s.shape}."
        )
    if not (np.all(np.isfinite(t)) and np.all(t > 0) and np.all(np.diff(t) > 0)):
        raise ValueError(f"`tokens` must be finite, > 0 and strictly increasing, got {t}.")
    if not np.all(np.isfinite(y)) or np.any(s < 0) or np.any(np.isinf(s)):
        raise ValueError(f"`{names[0]}` must be finite and `{names[1]}` finite and >= 0 (or None).")
    return t, y, s


def _weights(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, bool]:
    # Inverse-variance weights and whether every stderr is known (else equal weights).
    known = not np.isnan(s).any()
    floor = 1e-12 * max(float(np.max(np.abs(y))), 1e-12)  # a stderr of 0 means "exact"
    return (1.0 / np.maximum(s, floor) ** 2 if known else np.ones_like(y)), known


def _cubic_residuals(tokens: Sequence[float], values: np.ndarray) -> np.ndarray:
    # Each point's distance from the cubic (in log tokens) through its two neighbours on
    # each side, scaled to the noise std; `values` (n,) or (n, curves), one column each.
    x = np.log(np.asarray(tokens, dtype=float))
    centre = np.arange(2, len(x) - 2)
    nodes = centre[:, None] + np.array([-2, -1, 1, 2])
    lagrange = np.ones(nodes.shape)
    for k in range(4):
        for j in range(4):
            if j != k:
                lagrange[:, k] *= (x[centre] - x[nodes[:, j]]) / (x[nodes[:, k]] - x[nodes[:, j]])
    fitted = np.einsum("ck,ck...->c...", lagrange, values[nodes])
    scale = np.sqrt(1 + np.sum(lagrange**2, axis=1))
    return (values[centre] - fitted) / scale.reshape(-1, *([1] * (values.ndim - 1)))


def _robust_rms(resid: np.ndarray) -> np.ndarray:
    # Per column: residuals beyond 4 robust stds dropped, the RMS of the rest, times
    # 1 + 1/sqrt(m) for an estimate from m residuals.
    keep = np.abs(resid) <= 4 * _MAD_TO_SD * np.median(np.abs(resid), axis=0)
    m = np.sum(keep, axis=0)
    return np.sqrt(np.sum(np.where(keep, resid**2, 0.0), axis=0) / m) * (1 + 1 / np.sqrt(m))


def estimate_noise(tokens: Sequence[float], values: Sequence[float]) -> float:
    """Noise std of a smooth curve, from how far each point sits off its neighbours' cubic.

    Each point with two neighbours on each side is compared with the cubic (in log
    tokens) through those four, so smooth curvature is not counted as noise. Residuals
    beyond 4 robust standard deviations (outliers) are dropped, the rest give an RMS,
    multiplied by ``1 + 1/sqrt(m)`` for the uncertainty of an estimate from ``m``
    residuals: the estimate errs high, toward no alarm.

    Returns:
        The estimated std, or NaN with fewer than 5 points.
    """
    y = np.asarray(values, dtype=float)
    if len(y) < 5:
        return math.nan
    return float(_robust_rms(_cubic_residuals(tokens, y)))


def _robust_bottom(y: np.ndarray, s: np.ndarray) -> tuple[int, float, float]:
    # The lowest median of three neighbours, the lowest snapshot of that window, and the
    # median's stderr.
    if len(y) < 3:
        i = int(np.argmin(y))
        return i, float(y[i]), float(s[i])
    windows = np.stack([y[:-2], y[1:-1], y[2:]], axis=1)
    medians = np.sort(windows, axis=1)[:, 1]
    k = int(np.argmin(medians))
    index = k + int(np.argmin(windows[k]))
    stderr = _MEDIAN_OF_3_SD * math.sqrt(float(np.mean(s[k : k + 3] ** 2)))
    return index, float(medians[k]), stderr


def _paired_stderrs(
    tokens: np.ndarray, samples: Sequence[Sequence[float] | None], reference: int
) -> np.ndarray:
    # Per snapshot: the standard error of a paired rise from the snapshot `reference` (of
    # the mean of the per-sample differences); NaN where either snapshot lacks samples.
    # Only measurement noise counts: the samples are fixed (the same directions every
    # time), so how their own curves differ is part of the signal, not noise. The noise
    # of one sample is read off its own curve (each sample minus the mean of all, so the
    # common shape cancels first, then :func:`estimate_noise`), pooled over the samples:
    # many more degrees of freedom than the spread of K differences at one snapshot,
    # which stands in while the curves are too short.
    out = np.full(len(samples), np.nan)
    base = samples[reference]
    if base is None or len(base) < 2:
        return out
    k = len(base)
    rows = [i for i, these in enumerate(samples) if these is not None and len(these) == k]
    matrix = np.asarray([samples[i] for i in rows], dtype=float)
    pooled = sample_noise(tokens[rows], matrix)
    base_array = np.asarray(base, dtype=float)
    for i, these in zip(rows, matrix):
        if i == reference:
            continue
        if math.isfinite(pooled):
            out[i] = pooled * math.sqrt(2.0 / k)
        else:
            out[i] = float(np.std(these - base_array, ddof=1)) / math.sqrt(k)
    return out


def sample_noise(tokens: Sequence[float], samples: np.ndarray) -> float:
    """The measurement noise std of one sample, pooled over samples fixed across snapshots.

    ``samples`` is ``(snapshots, K)``: each column one sample's own curve (e.g. one noise
    direction's perturbed loss). The mean over samples is taken out first, so the shape
    they share cancels; :func:`estimate_noise`'s residuals of each column are then pooled
    (``K / (K - 1)`` undoes what taking out the mean removed). NaN with fewer than 5
    snapshots or fewer than 2 samples.
    """
    matrix = np.asarray(samples, dtype=float)
    if matrix.ndim != 2 or len(matrix) < 5 or matrix.shape[1] < 2:
        return math.nan
    k = matrix.shape[1]
    own = matrix - matrix.mean(axis=1, keepdims=True)
    noise = _robust_rms(_cubic_residuals(np.asarray(tokens, dtype=float), own))
    return math.sqrt(float(np.mean(noise**2)) * k / (k - 1))


def _check_samples(
    samples: Sequence[Sequence[float] | None] | None, n: int
) -> list[Sequence[float] | None]:
    if samples is None:
        return [None] * n
    if len(samples) != n:
        raise ValueError(
            f"`samples` must hold one entry per snapshot ({n}), got {len(samples)}. Pass None"
            " for a snapshot without per-sample values."
        )
    for these in samples:
        if these is not None and not np.all(np.isfinite(np.asarray(these, dtype=float))):
            raise ValueError("`samples` must be finite numbers (or None per snapshot).")
    return list(samples)


def detect_crossing(
    tokens: Sequence[float],
    values: Sequence[float],
    stderrs: Sequence[float | None] | None = None,
    *,
    samples: Sequence[Sequence[float] | None] | None = None,
    patience: int = DEFAULT_PATIENCE,
    min_rise: float = 0.0,
    noise_sigmas: float = DEFAULT_NOISE_SIGMAS,
    min_points: int = DEFAULT_MIN_POINTS,
) -> Crossing:
    """Whether the curve has turned upward, from its snapshots so far.

    The bottom is the lowest median of three neighbouring snapshots: one outlier
    cannot become the bottom, and it is biased low much less than the raw minimum of
    many noisy points (on a noiseless curve it can cost one snapshot of delay). Counting
    back from the latest snapshot, each one after the bottom whose rise above it exceeds
    ``max(noise_sigmas * se_rise, min_rise)`` adds one to ``consecutive_above``; the curve
    has crossed once that reaches ``patience``.

    ``se_rise``, the standard error of a rise, comes one of two ways:

    - **paired**, where the snapshot and the bottom snapshot (the lowest of that window)
      both carry ``samples`` (one value per sample, the same samples in the same order at
      every snapshot: common random numbers): the rise is measured from the bottom
      snapshot itself, and ``se_rise`` is the standard error of the mean of the
      per-sample differences, from each sample's measurement noise. The spread a sample
      shares at every snapshot cancels in the difference, so this is far smaller than
      the spread across samples at one snapshot;
    - otherwise, the rise is from the smoothed bottom and ``se_rise =
      sqrt(se**2 + se_bottom**2)``: each snapshot's ``se`` is the larger of its reported
      stderr and :func:`estimate_noise`, the bottom's that of a median of three,
      ``0.67 * se``.

    Args:
        tokens: Strictly increasing token counts.
        values: The signal at each token count (the mean of its samples, where it has some).
        stderrs: Standard error of each value; None (all or some): :func:`estimate_noise`.
        samples: Per snapshot, the values of its samples in a fixed order, or None.
        patience: Snapshots in a row that must sit above the bottom.
        min_rise: Smallest rise, in the signal's units, that counts.
        noise_sigmas: How many standard errors of the rise it must exceed.
        min_points: No crossing is declared with fewer snapshots.

    Returns:
        A :class:`Crossing`.

    Raises:
        ValueError: On non-increasing tokens, non-finite values or samples, negative
            stderrs, or ``samples`` of another length than ``tokens``.

    Example::

        detect_crossing([1e6, 2e6, 4e6, 8e6, 16e6], [3.0, 2.5, 2.4, 2.6, 2.9], [0.01] * 5,
                        min_points=5).crossed  # True
    """
    t, y, s = _as_arrays(tokens, values, stderrs)
    per_sample = _check_samples(samples, len(y))
    if len(y) == 0:
        return Crossing(False, None, None, None, None, None, 0)
    # A reported stderr can be too small (it comes from a handful of noise draws): the
    # curve's own scatter is a floor for it, and the whole answer where none is reported.
    # With neither (fewer than 5 points, no stderr) the thresholds are NaN: no crossing.
    scatter = estimate_noise(t, y)
    s = np.fmax(s, scatter)
    index, bottom, bottom_se = _robust_bottom(y, s)
    se_rise = np.sqrt(s**2 + bottom_se**2)
    paired = _paired_stderrs(t, per_sample, index)
    rises = np.where(np.isnan(paired), y - bottom, y - y[index])
    thresholds = np.where(np.isnan(paired), se_rise, np.nan_to_num(paired))
    thresholds = np.maximum(noise_sigmas * thresholds, min_rise)
    above = rises > thresholds
    consecutive = 0
    for i in range(len(y) - 1, index, -1):
        if not above[i]:
            break
        consecutive += 1
    crossed = len(y) >= min_points and consecutive >= patience
    rise = float(rises[-1])
    return Crossing(
        crossed,
        index,
        bottom,
        bottom_se,
        rise,
        float(thresholds[-1]),
        consecutive,
        paired=not np.isnan(paired[-1]),
    )
