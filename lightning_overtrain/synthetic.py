"""Synthetic probe curves shaped like the paper's, with a known answer.

Catastrophic overtraining (Springer et al. 2025) makes a probe signal such as
the perturbed loss U-shaped in tokens: a falling base loss plus a rising
sensitivity, ``y(T) = a + b * T**-alpha + c * T**beta``. These curves let the
inflection detector be tested and benchmarked against the truth.

Kinds:

- ``"u_shape"``: falling base plus rising sensitivity (``alpha`` 0.2-0.8, ``beta``
  0.2-1.0), bottom at 35-65% of the range in log tokens; ``true_bottom_tokens`` is
  the analytic minimum
  ``T* = (alpha * b / (beta * c)) ** (1 / (alpha + beta))``.
- ``"late_bend"``: the same, with the bottom late (70-85% of the range in log
  tokens) and a steeper rise (``beta`` 0.6-1.5 instead of 0.2-1.0), so that only a
  few snapshots follow the bottom but the bend can show inside the range.
- ``"monotone"``: the falling base alone (``alpha`` 0.1-0.8).
- ``"plateau"``: falling linearly in log tokens, then flat from 20-60% of the range.
- ``"spikes"``: monotone, plus rare single-snapshot outliers of either sign
  (at least two clean snapshots between two outliers).

The noiseless curve spans ``[2, 2 + span]`` over the sampled tokens. Noise is Gaussian
with std ``noise * span`` (``noise_unit="range"``: a fraction of the dynamic range)
or ``noise`` itself (``"absolute"``). The reported ``stderrs`` are the true std times
``stderr_scale`` (1.0: honest; below 1: underestimated). Outliers of ``"spikes"``
are 10-50% of the span and are not reflected in ``stderrs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("u_shape", "late_bend", "monotone", "plateau", "spikes")
NOISE_UNITS = ("range", "absolute")

_BASE_LOSS = 2.0  # the curves look like losses: 2 at their lowest
_SPIKE_PROB = 0.1  # chance that a snapshot is an outlier (before the spacing rule)
_SPIKE_GAP = 3  # outliers are at least this many snapshots apart


@dataclass(frozen=True)
class SyntheticCurve:
    """One synthetic probe curve, sampled at log-spaced token counts."""

    kind: str
    tokens: np.ndarray
    """Token counts, log-spaced and strictly increasing."""
    values: np.ndarray
    """The measured signal: ``clean`` plus noise (and outliers for ``"spikes"``)."""
    stderrs: np.ndarray
    """The standard error reported with each value (true noise std times ``stderr_scale``)."""
    clean: np.ndarray
    """The noiseless curve at ``tokens``."""
    noise_std: float
    """The true std of the measurement noise."""
    true_bottom_tokens: float | None
    """The analytic minimum ``T*`` of the U (``u_shape``, ``late_bend``); else None."""


def _u_shape(
    rng: np.random.Generator,
    t: np.ndarray,
    bottom_at: tuple[float, float],
    betas: tuple[float, float] = (0.2, 1.0),
) -> tuple[np.ndarray, float]:
    alpha, beta = rng.uniform(0.2, 0.8), rng.uniform(*betas)
    t_star = t[-1] ** rng.uniform(*bottom_at)  # t = T / T_first, so log t spans the range
    b = 1.0
    c = alpha * b / (beta * t_star ** (alpha + beta))
    return b * t**-alpha + c * t**beta, t_star


def _monotone(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    return t ** -rng.uniform(0.1, 0.8)


def _plateau(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    x = np.log10(t)
    knee = x[-1] * rng.uniform(0.2, 0.6)
    width = rng.uniform(0.05, 0.3)  # decades over which the fall rounds into the flat
    return width * np.logaddexp(0.0, (knee - x) / width)


def _spike_mask(rng: np.random.Generator, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    last = -_SPIKE_GAP
    for i in range(1, n):
        if i - last >= _SPIKE_GAP and rng.random() < _SPIKE_PROB:
            mask[i], last = True, i
    return mask


def make_curve(
    kind: str,
    n_points: int = 32,
    seed: int = 0,
    noise: float = 0.02,
    *,
    noise_unit: str = "range",
    stderr_scale: float = 1.0,
    span: float = 1.0,
    tokens_range: tuple[float, float] = (1e6, 1e10),
) -> SyntheticCurve:
    """Draw one synthetic probe curve.

    Args:
        kind: One of ``KINDS``.
        n_points: Number of snapshots, log-spaced over ``tokens_range``.
        seed: Seed of the ``numpy.random.Generator`` that draws the shape and the noise.
        noise: Noise std, as a fraction of the curve's dynamic range or absolute.
        noise_unit: ``"range"`` or ``"absolute"``: how ``noise`` is read.
        stderr_scale: Reported stderr over the true noise std (< 1: underestimated).
        span: Dynamic range (max - min) of the noiseless curve, in loss units.
        tokens_range: First and last token counts.

    Returns:
        A :class:`SyntheticCurve`.

    Raises:
        ValueError: On an unknown ``kind`` or ``noise_unit``, or a bad number.

    Example::

        curve = make_curve("u_shape", n_points=32, seed=0, noise=0.02)
        curve.tokens, curve.values, curve.stderrs, curve.true_bottom_tokens
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    if noise_unit not in NOISE_UNITS:
        raise ValueError(f"`noise_unit` must be one of {NOISE_UNITS}, got {noise_unit!r}.")
    if n_points < 3:
        raise ValueError(f"`n_points` must be >= 3, got {n_points}.")
    if not (noise >= 0 and stderr_scale >= 0 and span > 0):
        raise ValueError(
            f"`noise`, `stderr_scale` must be >= 0 and `span` > 0, got {noise}, {stderr_scale},"
            f" {span}."
        )
    rng = np.random.default_rng(seed)
    tokens = np.geomspace(tokens_range[0], tokens_range[1], n_points)
    t = tokens / tokens[0]
    t_star = None
    if kind == "u_shape":
        shape, t_star = _u_shape(rng, t, bottom_at=(0.35, 0.65))
    elif kind == "late_bend":
        shape, t_star = _u_shape(rng, t, bottom_at=(0.7, 0.85), betas=(0.6, 1.5))
    elif kind == "plateau":
        shape = _plateau(rng, t)
    else:
        shape = _monotone(rng, t)
    clean = _BASE_LOSS + span * (shape - shape.min()) / (shape.max() - shape.min())
    noise_std = float(noise if noise_unit == "absolute" else noise * span)
    values = clean + noise_std * rng.standard_normal(n_points)
    if kind == "spikes":
        mask = _spike_mask(rng, n_points)
        sizes = span * rng.uniform(0.1, 0.5, n_points) * rng.choice([-1.0, 1.0], n_points)
        values = values + np.where(mask, sizes, 0.0)
    return SyntheticCurve(
        kind=kind,
        tokens=tokens,
        values=values,
        stderrs=np.full(n_points, noise_std * stderr_scale),
        clean=clean,
        noise_std=noise_std,
        true_bottom_tokens=None if t_star is None else float(tokens[0] * t_star),
    )
