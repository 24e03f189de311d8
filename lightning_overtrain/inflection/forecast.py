"""Where will a probe signal turn upward? Power-law fits of its two terms.

- :func:`fit_forecast`: fitting ``y = a + b * T**-alpha + c * T**beta``, where is the
  bottom ``T* = (alpha * b / (beta * c)) ** (1 / (alpha + beta))``, and how sure are we?
- :func:`fit_forecast_decomposed`: the same ``T*`` from the two terms measured apart,
  the base loss ``a + b * T**-alpha`` and the sensitivity ``d + c * T**beta`` (for the
  perturbed loss: the reference loss and ``delta``), each fitted on its own. Far better
  determined than the single curve, where the rise hides in the noise long before ``T*``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightning_overtrain.inflection.crossing import DEFAULT_MIN_POINTS, _as_arrays, _weights

DEFAULT_FORECAST_LEVEL = 0.8

_ALPHAS = np.geomspace(0.05, 2.0, 32)  # exponents of the falling base, on a log grid
_BETAS = np.geomspace(0.05, 2.0, 32)  # exponents of the rising sensitivity
_REFINE_STEPS = 20  # Levenberg-Marquardt steps; converges in ~5-15 on U-shaped data
_FIT_PARAMS = 5  # a, b, c, alpha, beta
_HERMITE_NODES = np.array([-math.sqrt(3.0), 0.0, math.sqrt(3.0)])  # 3-point rule for N(0, 1)
_HERMITE_WEIGHTS = np.array([1 / 6, 2 / 3, 1 / 6])
_TERM_EXPONENTS = np.geomspace(0.02, 3.0, 48)  # each separately fitted term's exponent
_ZOOM_ROUNDS = 4  # each round narrows the grid ~8.5x around the best exponent
_ZOOM_POINTS = 16
_TERM_PARAMS = 3  # offset, scale, exponent
# delta's floor d: 0 (a power law from zero) or above 0, equally likely a priori. Fitting
# d >= 0 alone, the noise pushes d up and T* early whenever the true floor is 0.
_SENSITIVITY_OFFSETS = ("zero", "floor")
_NEGLIGIBLE = 30.0  # cells whose log weight is this far below the best carry nothing


@dataclass(frozen=True)
class Forecast:
    """Where the fitted curve bottoms out: ``tokens``, within ``[low, high]``.

    ``low``/``high`` bound a central credible interval at the fit's ``level``
    (default 80%); ``high`` is ``inf`` when "never turns up" is still plausible.
    """

    tokens: float
    low: float
    high: float


def _least_squares(y: np.ndarray, w: np.ndarray, *terms: np.ndarray):
    return _weighted_fit(y, w, [np.ones_like(y), *terms])  # y on [1, *terms]


def _weighted_fit(y: np.ndarray, w: np.ndarray, cols: list[np.ndarray]):
    # Weighted least squares of y on cols, each a stack (..., n) broadcasting against the
    # others: coefficients (..., k), chi2 (...), residuals, Gram matrices.
    k = len(cols)
    shape = np.broadcast_shapes(*(c.shape for c in cols))[:-1]
    gram = np.empty((*shape, k, k))
    for i in range(k):
        for j in range(i, k):
            gram[..., i, j] = gram[..., j, i] = np.sum(w * cols[i] * cols[j], axis=-1)
    gram += 1e-13 * np.trace(gram, axis1=-2, axis2=-1)[..., None, None] * np.eye(k)
    rhs = np.stack(np.broadcast_arrays(*(np.sum(w * y * c, axis=-1) for c in cols)), axis=-1)
    coef = np.linalg.solve(gram, rhs[..., None])[..., 0]
    resid = y - sum(coef[..., i, None] * c for i, c in enumerate(cols))
    return coef, np.sum(w * resid**2, axis=-1), resid, gram


def _profile_fit(x, y, w, alphas, betas):
    # Variable projection: at every (alpha, beta), the best a + b*t^-alpha + c*t^beta with
    # b, c >= 0. The constrained optimum is the best feasible fit among the subsets
    # {a,b,c}, {a,b}, {a,c}, {a}: a convex problem with two bounds.
    fall = np.exp(-alphas[:, None] * x)[:, None]  # (A, 1, n)
    rise = np.exp(betas[:, None] * (x - x[-1]))[None]  # (1, B, n), 1 at the latest point
    coef, chi2, _, gram = _least_squares(y, w, fall, rise)
    coef_b, chi2_b, _, _ = _least_squares(y, w, fall)
    coef_c, chi2_c, _, _ = _least_squares(y, w, rise)
    options = np.stack(
        np.broadcast_arrays(
            np.where((coef[..., 1] >= 0) & (coef[..., 2] >= 0), chi2, np.inf),
            np.where(coef_b[..., 1] >= 0, chi2_b, np.inf),
            np.where(coef_c[..., 1] >= 0, chi2_c, np.inf),
            np.sum(w * (y - np.average(y, weights=w)) ** 2),
        )
    )
    pick = np.argmin(options, axis=0)
    b = np.select([pick == 0, pick == 1], np.broadcast_arrays(coef[..., 1], coef_b[..., 1]))
    c = np.select([pick == 0, pick == 2], np.broadcast_arrays(coef[..., 2], coef_c[..., 1]))
    alpha, beta = np.meshgrid(alphas, betas, indexing="ij")
    log_t, var = _log_t_star(alpha, beta, b, c, x[-1], gram)
    falling_only = np.where(coef_b[:, 0, 1] >= 0, chi2_b[:, 0], np.inf)  # per alpha
    return np.min(options, axis=0), log_t, np.where(pick == 0, var, 0.0), falling_only


def _log_t_star(alpha, beta, b, c, x_last, gram):
    # Bottom of a + b*t^-alpha + c'*exp(beta*(x - x_last)), in log(T / T_first): +inf
    # without a rising term, -inf without a falling one (rising from the start). With its
    # variance from the linear coefficients' covariance (inverse Gram, unit scale).
    cov = np.linalg.inv(gram)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_t = (np.log(alpha * b) - np.log(beta * c) + beta * x_last) / (alpha + beta)
        var = cov[..., 1, 1] / b**2 + cov[..., 2, 2] / c**2 - 2 * cov[..., 1, 2] / (b * c)
    log_t = np.where(c > 0, np.where(b > 0, log_t, -np.inf), np.inf)
    return log_t, np.where(np.isfinite(log_t), var / (alpha + beta) ** 2, 0.0)


def _exponent_fit(x, y, w, log_exponents):
    # Unconstrained fits at rows of (log alpha[, log beta]): chi2 (K,), weighted residuals
    # (K, n), b, c (0 without a rising term), Gram matrices.
    fall = np.exp(-np.exp(log_exponents[:, :1]) * x)
    if log_exponents.shape[1] == 1:
        coef, chi2, resid, gram = _least_squares(y, w, fall)
        return chi2, np.sqrt(w) * resid, coef[:, 1], np.zeros(len(coef)), gram
    rise = np.exp(np.exp(log_exponents[:, 1:]) * (x - x[-1]))
    coef, chi2, resid, gram = _least_squares(y, w, fall, rise)
    return chi2, np.sqrt(w) * resid, coef[:, 1], coef[:, 2], gram


def _refine(x, y, w, start):
    # Levenberg-Marquardt on the log exponents (alpha, beta; or alpha alone for the falling
    # term only) from a grid cell: the grid is coarse, the exponents sit in a long narrow
    # valley, and T* extrapolated from a falling curve is sensitive to them. Each step tries
    # three dampings at once (fewer numpy calls). Returns (chi2, log T*, its variance) at the
    # best point found with b, c >= 0 (log T* = inf with alpha alone), or None.
    p = np.array(start, dtype=float)
    d = len(p)
    bounds = np.log([_ALPHAS[0], _ALPHAS[-1]])
    best, damping = None, 1e-2
    for _ in range(_REFINE_STEPS):
        chi2, r, *_ = _exponent_fit(x, y, w, p + np.vstack([np.zeros(d), 1e-6 * np.eye(d)]))
        jac = (r[1:] - r[0]).T / 1e-6  # (n, d)
        jtj, grad = jac.T @ jac, jac.T @ r[0]
        dampings = damping * np.array([0.1, 1.0, 10.0])
        lhs = jtj + dampings[:, None, None] * np.diag(np.diag(jtj) + 1e-30)
        steps = np.linalg.solve(lhs, -np.broadcast_to(grad, (3, d))[..., None])[..., 0]
        trials = np.clip(p + steps, *bounds)
        trial_chi2, _, b, c, gram = _exponent_fit(x, y, w, trials)
        k = int(np.argmin(trial_chi2))
        if not trial_chi2[k] < chi2[0]:
            damping *= 100
            if damping > 1e6:
                break
            continue
        p, damping = trials[k], dampings[k]
        if d == 1 and b[k] >= 0:
            best = (float(trial_chi2[k]), math.inf, 0.0)
        elif b[k] >= 0 and c[k] >= 0:
            log_t, var = _log_t_star(*np.exp(p), b[k], c[k], x[-1], gram[k])
            best = (float(trial_chi2[k]), float(log_t), float(var))
        if chi2[0] - trial_chi2[k] <= 1e-9 * chi2[0]:
            break
    return best


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, probs: Sequence[float]):
    total = float(np.sum(weights))
    if not total > 0:  # no weight at all (no falling base fits): read as "never turns up"
        return np.full(len(probs), np.inf)
    order = np.argsort(values, kind="stable")
    cdf = np.cumsum(weights[order]) / total
    picks = np.minimum(np.searchsorted(cdf, probs), len(cdf) - 1)
    return values[order][picks]


def fit_forecast(
    tokens: Sequence[float],
    values: Sequence[float],
    stderrs: Sequence[float | None] | None = None,
    *,
    level: float = DEFAULT_FORECAST_LEVEL,
    min_points: int = DEFAULT_MIN_POINTS,
) -> Forecast | None:
    """Forecast the token count ``T*`` where the curve bottoms out.

    Fits ``y = a + b * T**-alpha + c * T**beta`` (``b, c >= 0``) by variable
    projection: on a 32 x 32 log grid of exponents in [0.05, 2], ``a, b, c`` by
    weighted least squares; the best cell is then polished off the grid. Two models
    share the prior evenly: "turns up" (both terms, over the grid) and "never turns up"
    (``c = 0``, over alpha). Cells are weighted by their likelihood ``exp(-chi2 / 2)``,
    with the errors scaled up by ``sqrt(chi2_min / dof)`` when the fit is worse than the
    stderrs say (or set by it when no stderrs are given); each cell's ``T*`` is spread
    by the uncertainty of ``b, c``. ``T*`` is the weighted median, the interval the
    central ``level`` quantiles (a credible interval, 80% by default; ``high = inf``
    when "never" keeps more than ``(1 - level) / 2`` of the weight). Deterministic;
    about 5-10 ms at 40 points. A curve that flattens abruptly (a plateau) reads as a
    shallow U and can get a confident, wrong forecast: decide on the crossing test.

    Args:
        tokens: Strictly increasing token counts.
        values: The signal at each token count.
        stderrs: Standard error of each value; None (all or some) fits unweighted.
        level: Probability mass of the reported interval, in (0, 1).
        min_points: Fewer snapshots (or fewer than 6) give None.

    Returns:
        A :class:`Forecast`, or None with too few points or when "never turns up" (or
        "rising from the first point") is the likelier reading.

    Raises:
        ValueError: On non-increasing tokens, non-finite values, or negative stderrs.

    Example::

        t = np.geomspace(1e6, 1e10, 20)
        fit_forecast(t, 2 + (t / 1e6) ** -0.5 + 1e-3 * (t / 1e6) ** 0.5).tokens  # ~1e9
    """
    t, y, s = _as_arrays(tokens, values, stderrs)
    n = len(y)
    if n < max(min_points, _FIT_PARAMS + 1):
        return None
    w, known = _weights(y, s)
    x = np.log(t / t[0])
    y = y - np.average(y, weights=w)
    chi2, log_t, var, falling = _profile_fit(x, y, w, _ALPHAS, _BETAS)
    rising = [chi2.ravel(), log_t.ravel(), var.ravel()]
    # Polish the best cell of each model off the grid (with little noise the grid steps
    # would decide the answer) and add it to that model's cells.
    i, j = np.unravel_index(np.argmin(chi2), chi2.shape)
    if np.isfinite(log_t[i, j]):
        polished = _refine(x, y, w, np.log([_ALPHAS[i], _BETAS[j]]))
        if polished is not None:
            rising = [np.append(cells, v) for cells, v in zip(rising, polished)]
    if np.isfinite(falling).any():
        polished = _refine(x, y, w, np.log([_ALPHAS[np.argmin(falling)]]))
        falling = np.append(falling, np.inf if polished is None else polished[0])
    falling = falling[np.isfinite(falling)]
    best = min(float(np.min(rising[0])), float(np.min(falling, initial=np.inf)))
    scale = best / (n - _FIT_PARAMS)
    scale = max(scale, 1.0) if known else max(scale, np.finfo(float).tiny)
    # "Never turns up" (the falling term alone) and "turns up" (both terms) get half the
    # prior each, spread evenly over their cells; the likelihood does the rest.
    weight_rising = np.exp(-0.5 * (rising[0] - best) / scale) / len(rising[0])
    weight_never = np.exp(-0.5 * (falling - best) / scale) / max(len(falling), 1)
    # Three Gauss-Hermite nodes per cell carry the uncertainty of b and c into T*.
    spread = np.sqrt(scale * np.maximum(rising[2], 0.0))[:, None] * _HERMITE_NODES
    nodes = rising[1][:, None] + np.nan_to_num(spread, posinf=np.inf, neginf=-np.inf)
    nodes = np.append(nodes.ravel(), np.full(len(falling), np.inf))
    weights = np.append((weight_rising[:, None] * _HERMITE_WEIGHTS).ravel(), weight_never)
    probs = [0.5, (1 - level) / 2, (1 + level) / 2]
    median, low, high = _weighted_quantiles(nodes, weights, probs)
    if not math.isfinite(median):
        return None
    with np.errstate(over="ignore"):
        return Forecast(*(float(t[0] * np.exp(v)) for v in (median, low, high)))


def _power_term(x, y, w, log_p, sign, x_ref, offset):
    # y = d + k * exp(sign * p * (x - x_ref)) at each exponent p = exp(log_p), with k > 0
    # and d free ("free"), d >= 0 ("floor": the better of {d, k} if d >= 0 and {k}) or
    # d = 0 ("zero"). Returns chi2 (inf where infeasible), k and var(k) at unit noise scale.
    term = np.exp(sign * np.exp(log_p)[:, None] * (x - x_ref))
    chi2, k, var = np.full(len(log_p), np.inf), np.zeros(len(log_p)), np.zeros(len(log_p))
    if offset != "zero":
        coef, chi2_dk, _, gram = _least_squares(y, w, term)
        ok = (coef[:, 1] > 0) & ((coef[:, 0] >= 0) | (offset == "free"))
        chi2 = np.where(ok, chi2_dk, chi2)
        k, var = np.where(ok, coef[:, 1], k), np.where(ok, np.linalg.inv(gram)[:, 1, 1], var)
    if offset != "free":
        coef, chi2_k, _, gram = _weighted_fit(y, w, [term])
        ok = (coef[:, 0] > 0) & (chi2_k < chi2)
        chi2 = np.where(ok, chi2_k, chi2)
        k, var = np.where(ok, coef[:, 0], k), np.where(ok, 1.0 / gram[:, 0, 0], var)
    return chi2, k, var


def _zoomed_profile(x, y, w, sign, x_ref, offset):
    # The profile over a log grid of exponents, zoomed in around its best cell: with little
    # noise the grid step would decide T*. Returns log exponents, chi2, k, var(k).
    log_p = np.log(_TERM_EXPONENTS)
    chi2, k, var = _power_term(x, y, w, log_p, sign, x_ref, offset)
    for _ in range(_ZOOM_ROUNDS):
        i = int(np.argmin(chi2))
        lo, hi = log_p[max(i - 1, 0)], log_p[min(i + 1, len(log_p) - 1)]
        new = np.linspace(lo, hi, _ZOOM_POINTS + 2)[1:-1]
        found = _power_term(x, y, w, new, sign, x_ref, offset)
        log_p, index = np.unique(np.append(log_p, new), return_index=True)
        chi2, k, var = (np.append(old, more)[index] for old, more in zip((chi2, k, var), found))
    return log_p, chi2, k, var


def _exponent_posterior(x, y, w, known, sign, x_ref, offsets):
    # The cells of each offset model in `offsets` (sharing evenly half the prior) over the
    # exponent, each weighted by its likelihood and its width on the log grid (a prior
    # uniform in the log exponent); and "flat" (k = 0; d >= 0 unless the offset is free),
    # with the other half. Returns exponents, k, var(k) (noise scale applied), log weights,
    # and the flat log weight.
    cells = [_zoomed_profile(x, y, w, sign, x_ref, offset) for offset in offsets]
    mean = np.average(y, weights=w)
    flat = float(np.sum(w * (y - (mean if offsets == ("free",) else max(mean, 0.0))) ** 2))
    best = min(flat, *(float(np.min(cell[1])) for cell in cells))
    scale = best / (len(y) - _TERM_PARAMS)
    scale = max(scale, 1.0) if known else max(scale, np.finfo(float).tiny)
    exponents, ks, variances, log_weights = [], [], [], []
    for log_p, chi2, k, var in cells:
        edges = np.concatenate([log_p[:1], (log_p[1:] + log_p[:-1]) / 2, log_p[-1:]])
        log_width = np.log(np.diff(edges) / (log_p[-1] - log_p[0]))
        exponents.append(np.exp(log_p))
        ks.append(k)
        variances.append(var * scale)
        log_weights.append(-0.5 * (chi2 - best) / scale + log_width - math.log(len(cells)))
    return (
        np.concatenate(exponents),
        np.concatenate(ks),
        np.concatenate(variances),
        np.concatenate(log_weights),
        -0.5 * (flat - best) / scale,
    )


def fit_forecast_decomposed(
    tokens: Sequence[float],
    base: Sequence[float],
    base_stderrs: Sequence[float | None] | None,
    sensitivity: Sequence[float],
    sensitivity_stderrs: Sequence[float | None] | None,
    *,
    level: float = DEFAULT_FORECAST_LEVEL,
    min_points: int = DEFAULT_MIN_POINTS,
) -> Forecast | None:
    """Forecast ``T*`` from the two terms measured apart: the base loss and the sensitivity.

    The perturbed loss is ``base + sensitivity``: the reference loss ``L(theta_T)`` (falling,
    measured on fixed batches, so precise) plus ``delta(T)`` (rising). Each term gets its own
    fit, ``base = a + b * T**-alpha`` and ``sensitivity = d + c * T**beta`` (``b, c > 0``;
    the floor ``d`` either 0, a power law from zero, or fitted ``>= 0``: a perturbation
    never lowers the loss; the two equally likely a priori), and ``T*`` is where their
    slopes cancel, ``(alpha * b / (beta * c)) ** (1 / (alpha + beta))``. Each exponent is
    profiled on a log grid in [0.02, 3] refined around its best value; ``(alpha, beta)``
    cells are weighted by their likelihoods (the terms are measured independently), errors
    scaled up by ``sqrt(chi2_min / dof)`` when a fit is worse than its stderrs say (or set
    by it without stderrs), and the uncertainty of ``b, c`` spreads each cell's ``T*``.
    "Never turns up" (a flat sensitivity) shares the prior evenly with "rising". ``T*`` is
    the weighted median, the interval the central ``level`` quantiles (``high = inf`` when
    "never" keeps more than ``(1 - level) / 2``). Deterministic. About 10 ms at 30 points.

    What it can and cannot see: the rise is visible early only as long as it is not buried
    under a floor of ``delta`` (``d``) and its noise. A sensitivity that rises from about
    zero is extrapolated well; one that starts on a floor much larger than its rise so far
    gets a wide interval (see ``benchmarks/results/detector_validation.md``).

    Args:
        tokens: Strictly increasing token counts.
        base: The falling term at each token count (the reference loss).
        base_stderrs: Its standard errors; None (all or some) fits unweighted.
        sensitivity: The rising term at each token count (``delta``).
        sensitivity_stderrs: Its standard errors; None (all or some) fits unweighted.
        level: Probability mass of the reported interval, in (0, 1).
        min_points: Fewer snapshots (or fewer than 6) give None.

    Returns:
        A :class:`Forecast`, or None with too few points, or when "the sensitivity is not
        rising" (or "the base is not falling") is the likelier reading.

    Raises:
        ValueError: On non-increasing tokens, non-finite terms, or negative stderrs.

    Example::

        t = np.geomspace(1e6, 1e10, 20)
        base, sensitivity = 2 + (t / 1e6) ** -0.5, 1e-3 * (t / 1e6) ** 0.5
        fit_forecast_decomposed(t, base, None, sensitivity, None).tokens  # ~1e9
    """
    t, y_base, s_base = _as_arrays(tokens, base, base_stderrs, ("base", "base_stderrs"))
    _, y_sens, s_sens = _as_arrays(
        tokens, sensitivity, sensitivity_stderrs, ("sensitivity", "sensitivity_stderrs")
    )
    if len(t) < max(min_points, _TERM_PARAMS * 2):
        return None
    x = np.log(t / t[0])
    alpha, b, var_b, weight_a, _ = _exponent_posterior(
        x, y_base, *_weights(y_base, s_base), -1.0, 0.0, ("free",)
    )
    beta, c, var_c, weight_c, weight_never = _exponent_posterior(
        x, y_sens, *_weights(y_sens, s_sens), 1.0, x[-1], _SENSITIVITY_OFFSETS
    )
    top_a, top_c = np.max(weight_a), max(np.max(weight_c), weight_never)
    keep_a, keep_c = weight_a > top_a - _NEGLIGIBLE, weight_c > top_c - _NEGLIGIBLE
    alpha, b, var_b, weight_a = alpha[keep_a], b[keep_a], var_b[keep_a], weight_a[keep_a]
    beta, c, var_c, weight_c = beta[keep_c], c[keep_c], var_c[keep_c], weight_c[keep_c]
    weight_a, weight_c = np.exp(weight_a - top_a), np.exp(weight_c - top_c)
    # Every (alpha, beta) pair: T* in log(T / T_first), +inf without a rising sensitivity,
    # -inf without a falling base; its variance from b and c.
    alpha_, b_, var_b_ = alpha[:, None], b[:, None], var_b[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_t = (np.log(alpha_ * b_) - np.log(beta * c) + beta * x[-1]) / (alpha_ + beta)
        var = (var_b_ / b_**2 + var_c / c**2) / (alpha_ + beta) ** 2
    log_t = np.where(c > 0, np.where(b_ > 0, log_t, -np.inf), np.inf)
    spread = np.sqrt(np.where(np.isfinite(log_t), var, 0.0))[..., None] * _HERMITE_NODES
    nodes = np.append((log_t[..., None] + spread).ravel(), np.inf)
    pair_weights = weight_a[:, None, None] * weight_c[None, :, None] * _HERMITE_WEIGHTS
    weights = np.append(pair_weights.ravel(), math.exp(weight_never - top_c) * weight_a.sum())
    median, low, high = _weighted_quantiles(nodes, weights, [0.5, (1 - level) / 2, (1 + level) / 2])
    if not math.isfinite(median):
        return None
    with np.errstate(over="ignore"):
        return Forecast(*(float(t[0] * np.exp(v)) for v in (median, low, high)))
