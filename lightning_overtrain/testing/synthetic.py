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

``noise_unit="delta"`` reads ``noise`` as a fraction of the sensitivity at each snapshot
instead: the noise probe's spread across noise directions scales with ``delta`` itself
(about 8-20% of ``delta`` per antithetic pair on a tiny GPT, so 4-10% for 4 pairs).

Each curve also comes as the two terms the monitor measures apart, ``values = base +
sensitivity``: the reference loss ``L(theta_T)`` (``base``: the falling term, measured
on fixed batches, so its noise is tiny, ``base_noise``) and the noise probe's
``delta(T)`` (``sensitivity``: the rising term, plus ``sensitivity_floor * span``; it
carries the rest of the noise and the outliers). The curves that never turn up have a
flat sensitivity, ``0.1 * span`` above the floor (``delta`` plateaus under a constant lr).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("u_shape", "late_bend", "monotone", "plateau", "spikes")
NOISE_UNITS = ("range", "absolute", "delta")

_BASE_LOSS = 2.0  # the curves look like losses: 2 at their lowest
_SPIKE_PROB = 0.1  # chance that a snapshot is an outlier (before the spacing rule)
_SPIKE_GAP = 3  # outliers are at least this many snapshots apart
_FLAT_SENSITIVITY = 0.1  # the plateaued sensitivity of the curves that never turn up


@dataclass(frozen=True)
class SyntheticCurve:
    """One synthetic probe curve, sampled at log-spaced token counts."""

    kind: str
    tokens: np.ndarray
    """Token counts, log-spaced and strictly increasing."""
    values: np.ndarray
    """The measured signal, ``base + sensitivity``: ``clean`` plus noise (and outliers)."""
    stderrs: np.ndarray
    """The standard error reported with each value, that of ``sensitivity`` (the probe's
    ``perturbed_loss_stderr`` is its ``delta_stderr``: ``base`` counts as exact)."""
    clean: np.ndarray
    """The noiseless curve at ``tokens``."""
    noise_std: float
    """The true std of the measurement noise (the largest one with ``noise_unit="delta"``)."""
    true_bottom_tokens: float | None
    """The analytic minimum ``T*`` of the U (``u_shape``, ``late_bend``); else None."""
    base: np.ndarray
    """The measured falling term (the reference loss): ``base_clean`` plus its small noise."""
    base_stderrs: np.ndarray
    """The standard error reported with each ``base`` value."""
    sensitivity: np.ndarray
    """The measured rising term (``delta``), ``values - base``: with the noise and outliers."""
    sensitivity_stderrs: np.ndarray
    """The standard error reported with each ``sensitivity`` value (that of ``values``)."""
    base_clean: np.ndarray
    """The noiseless falling term; ``base_clean + sensitivity_clean == clean``."""
    sensitivity_clean: np.ndarray
    """The noiseless rising term (flat for the curves that never turn up)."""
    noise_stds: np.ndarray
    """The true std of the noise on ``values`` (and ``sensitivity``) at each snapshot."""


def _u_shape(
    rng: np.random.Generator,
    t: np.ndarray,
    bottom_at: tuple[float, float],
    betas: tuple[float, float] = (0.2, 1.0),
) -> tuple[np.ndarray, np.ndarray, float]:
    # The falling and the rising term, and the bottom of their sum.
    alpha, beta = rng.uniform(0.2, 0.8), rng.uniform(*betas)
    t_star = t[-1] ** rng.uniform(*bottom_at)  # t = T / T_first, so log t spans the range
    b = 1.0
    c = alpha * b / (beta * t_star ** (alpha + beta))
    return b * t**-alpha, c * t**beta, t_star


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
    base_noise: float = 0.001,
    sensitivity_floor: float = 0.0,
) -> SyntheticCurve:
    """Draw one synthetic probe curve.

    Args:
        kind: One of ``KINDS``.
        n_points: Number of snapshots, log-spaced over ``tokens_range``.
        seed: Seed of the ``numpy.random.Generator`` that draws the shape and the noise.
        noise: Noise std, as a fraction of the curve's dynamic range, absolute, or as a
            fraction of the sensitivity at each snapshot.
        noise_unit: ``"range"``, ``"absolute"`` or ``"delta"``: how ``noise`` is read.
        stderr_scale: Reported stderr over the true noise std (< 1: underestimated).
        span: Dynamic range (max - min) of the noiseless curve, in loss units.
        tokens_range: First and last token counts.
        base_noise: Noise std of ``base`` (the reference loss): absolute with
            ``noise_unit="absolute"``, else a fraction of the span.
        sensitivity_floor: The sensitivity at ``T -> 0``, as a fraction of the span: 0 is
            a power law from zero; above 0 the rise starts hidden under a floor.

    Returns:
        A :class:`SyntheticCurve`.

    Raises:
        ValueError: On an unknown ``kind`` or ``noise_unit``, or a bad number.

    Example::

        curve = make_curve("u_shape", n_points=32, seed=0, noise=0.02)
        curve.tokens, curve.values, curve.stderrs, curve.true_bottom_tokens
        curve.base, curve.sensitivity  # values == base + sensitivity
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    if noise_unit not in NOISE_UNITS:
        raise ValueError(f"`noise_unit` must be one of {NOISE_UNITS}, got {noise_unit!r}.")
    if n_points < 3:
        raise ValueError(f"`n_points` must be >= 3, got {n_points}.")
    if not (min(noise, stderr_scale, base_noise, sensitivity_floor) >= 0 and span > 0):
        raise ValueError(
            "`noise`, `stderr_scale`, `base_noise`, `sensitivity_floor` must be >= 0 and `span`"
            f" > 0, got {noise}, {stderr_scale}, {base_noise}, {sensitivity_floor}, {span}."
        )
    rng = np.random.default_rng(seed)
    tokens = np.geomspace(tokens_range[0], tokens_range[1], n_points)
    t = tokens / tokens[0]
    t_star, rising = None, None
    if kind == "u_shape":
        falling, rising, t_star = _u_shape(rng, t, bottom_at=(0.35, 0.65))
    elif kind == "late_bend":
        falling, rising, t_star = _u_shape(rng, t, bottom_at=(0.7, 0.85), betas=(0.6, 1.5))
    elif kind == "plateau":
        falling = _plateau(rng, t)
    else:
        falling = _monotone(rng, t)
    shape = falling if rising is None else falling + rising
    clean = _BASE_LOSS + span * (shape - shape.min()) / (shape.max() - shape.min())
    if rising is None:
        sensitivity_clean = np.full(n_points, span * (sensitivity_floor + _FLAT_SENSITIVITY))
    else:
        sensitivity_clean = span * (rising / np.ptp(shape) + sensitivity_floor)
    if noise_unit == "delta":
        noise_stds = noise * sensitivity_clean
    else:
        noise_stds = np.full(n_points, noise if noise_unit == "absolute" else noise * span)
    sensitivity = sensitivity_clean + noise_stds * rng.standard_normal(n_points)
    if kind == "spikes":
        mask = _spike_mask(rng, n_points)
        sizes = span * rng.uniform(0.1, 0.5, n_points) * rng.choice([-1.0, 1.0], n_points)
        sensitivity = sensitivity + np.where(mask, sizes, 0.0)
    # The base's wiggle is in the perturbed loss too, but not in delta: the probe measures
    # both losses on the same batches. It is drawn last, after the draws `values` had
    # before the terms existed.
    base_clean = clean - sensitivity_clean
    base_std = base_noise if noise_unit == "absolute" else base_noise * span
    base = base_clean + base_std * rng.standard_normal(n_points)
    return SyntheticCurve(
        kind=kind,
        tokens=tokens,
        values=base + sensitivity,
        stderrs=noise_stds * stderr_scale,
        clean=clean,
        noise_std=float(np.max(noise_stds)),
        true_bottom_tokens=None if t_star is None else float(tokens[0] * t_star),
        base=base,
        base_stderrs=np.full(n_points, base_std * stderr_scale),
        sensitivity=sensitivity,
        sensitivity_stderrs=noise_stds * stderr_scale,
        base_clean=base_clean,
        sensitivity_clean=sensitivity_clean,
        noise_stds=noise_stds,
    )
