"""Validate the inflection detector's crossing test on curves of this script's own making.

The generator is separate from the tests' (:mod:`lightning_overtrain.testing.synthetic`):
what the defaults were tuned on never grades them. Every curve has 28 snapshots, 4 per
decade of tokens from 1e6, and K = 4 samples per snapshot where the family samples
(the noise probe's default of 4 noise directions).

Families (all reported separately):

- ``u_shape``: ``base(T) + sens(T)``, ``base = 2 + b * t**-alpha`` (``t = T / 1e6``)
  and ``sens = c * t**beta``; the bottom at snapshot 8-18, so 10 or more follow it.
- ``monotone``: the base alone, falling (``alpha`` 0.1-0.8).
- ``plateau``: falling linearly in log tokens, then flat from snapshot 6-18 on.
- ``spikes``: monotone, and single snapshots (two clean ones or more between them,
  about one in six) raised by 3-8 noise stds, at every sample alike (a bad batch moves
  the weights, so every direction sees it).

Two noise models, each at 4 levels (``noise`` = a fraction of the U's depth, the drop
from the first snapshot to the bottom):

- **CRN** (common random numbers, as the noise probe samples): sample ``k`` follows its
  own smooth curve, ``base + s_k * sens`` (the direction's sensitivity ``s_k``,
  log-normal with 30% spread, and its own exponent ``beta + 0.05 z_k``), plus
  independent measurement noise of std ``noise * depth * sqrt(K)`` per sample. The
  detector gets the mean, its stderr across samples, and the samples.
- **independent**: the mean curve plus noise of std ``noise * depth``, reported honestly
  as the stderr; no samples (the detector's unpaired rule).

Detection metrics (for CRN curves also without their samples: the unpaired rule, as
before paired statistics): false alarms (a crossing anywhere on a curve that never
turns up); on U curves, hits (crossed after the true bottom snapshot, by the last
one), early (at or before the bottom) and the median delay in snapshots after the
bottom. The
**baseline** is an EarlyStopping-style rule: crossed when the latest ``patience``
snapshots all sit more than ``min_delta`` above the lowest one before them, with
``(patience, min_delta)`` tuned on the tuning seeds to the same false-alarm budget (1%).

The forecast is validated by ``benchmarks/forecast_validation.py`` on these curves and
others (its results: ``benchmarks/results/forecast_validation.md``).

Seeds: the defaults (``noise_sigmas`` over a grid, ``--tune``) and the baseline were
tuned on generator seeds 900-902; the report uses seeds 0-4 and gives the range over
them. One thread, about a CPU-minute. Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/detector_validation.py  # writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

from lightning_overtrain.inflection.config import DetectorConfig
from lightning_overtrain.inflection.crossing import detect_crossing

N_POINTS = 28
TOKENS = 1e6 * 10 ** (np.arange(N_POINTS) / 4)
K = 4
NOISES = (0.002, 0.005, 0.01, 0.02)
FAMILIES = ("u_shape", "monotone", "plateau", "spikes")
FLAT = FAMILIES[1:]
MODELS = ("crn", "independent")
FACTOR = 1.5
BUDGET = 0.01
REPORT_SEEDS = (0, 1, 2, 3, 4)
TUNING_SEEDS = (900, 901, 902)
# The baseline's grid: min_delta in units of the reported stderr of the latest snapshot.
BASELINE_GRID = [(p, d) for p in (1, 2, 3, 4) for d in np.arange(0.0, 8.01, 0.25)]


def make_curve(family: str, noise: float, model: str, rng: np.random.Generator) -> dict:
    """One curve: tokens, its mean, stderrs, samples (or None), the truth and its terms."""
    t = TOKENS / TOKENS[0]
    x = np.log(t)
    alpha = rng.uniform(0.2, 0.6) if family != "monotone" else rng.uniform(0.1, 0.8)
    base = 2.0 + t**-alpha
    bottom_at = None
    sens = np.zeros(N_POINTS)
    beta = rng.uniform(0.3, 0.8)
    if family == "u_shape":
        bottom_at = rng.uniform(8, 18)  # in snapshots
        t_star = t[0] * 10 ** (bottom_at / 4)
        c = alpha / (beta * t_star ** (alpha + beta))
        sens = c * t**beta
    elif family == "plateau":
        flat_from = int(rng.integers(6, 19))
        base = 2.0 + np.maximum(x[flat_from] - x, 0.0) / x[flat_from]
    mean_clean = base + sens
    depth = mean_clean[0] - mean_clean.min()
    sd = noise * depth
    spike = np.zeros(N_POINTS)
    if family == "spikes":
        i = int(rng.integers(0, 10))
        while i < N_POINTS:  # single-snapshot outliers: two clean snapshots between them
            spike[i] = rng.uniform(3, 8) * sd
            i += 3 + int(rng.geometric(0.15))
    if model == "crn":
        scales = np.exp(0.3 * rng.standard_normal(K))
        betas = beta + 0.05 * rng.standard_normal(K)
        own = np.stack([s * sens * t ** (b - beta) for s, b in zip(scales, betas)])
        clean = base + own.mean(axis=0)
        samples = base + own + spike + sd * math.sqrt(K) * rng.standard_normal((K, N_POINTS))
        values = samples.mean(axis=0)
        stderrs = samples.std(axis=0, ddof=1) / math.sqrt(K)
        sample_lists = [list(col) for col in samples.T]
    else:
        clean = mean_clean
        values = clean + spike + sd * rng.standard_normal(N_POINTS)
        stderrs = np.full(N_POINTS, sd)
        sample_lists = [None] * N_POINTS
    reference = base + 0.001 * depth * rng.standard_normal(N_POINTS)
    bottom = int(np.argmin(clean)) if family == "u_shape" else None
    true_t = None
    if family == "u_shape":  # the mean curve's own minimum, on a fine grid
        fine = np.geomspace(t[0], t[-1], 4000)
        own_fine = c * fine**beta
        if model == "crn":
            own_fine = np.mean([s * c * fine**b for s, b in zip(scales, betas)], axis=0)
        true_t = float(TOKENS[0] * fine[np.argmin(fine**-alpha + own_fine)])
    return {
        "values": values,
        "stderrs": stderrs,
        "samples": sample_lists,
        "bottom": bottom,
        "true_tokens": true_t,
        "reference": reference,
        "sd": sd,
        "base_clean": base,
    }


def first_crossing(curve: dict, config: DetectorConfig) -> int | None:
    y = curve["values"]
    for n in range(config.min_points, N_POINTS + 1):
        # Cheap skip: `patience` snapshots in a row above every earlier one's minimum is
        # necessary for a crossing (the bottom is at or above that minimum).
        tail = y[n - config.patience : n]
        if n - config.patience < 1 or not np.all(tail > y[: n - config.patience].min()):
            continue
        found = detect_crossing(
            TOKENS[:n],
            curve["values"][:n],
            curve["stderrs"][:n],
            samples=curve["samples"][:n],
            patience=config.patience,
            min_rise=config.min_rise,
            noise_sigmas=config.noise_sigmas,
            min_points=config.min_points,
        )
        if found.crossed:
            return n - 1
    return None


def baseline_crossing(curve: dict, patience: int, min_delta: float) -> int | None:
    """EarlyStopping: no new low for `patience` snapshots, each above it by min_delta x se."""
    y, se = curve["values"], curve["stderrs"]
    for n in range(patience + 1, N_POINTS + 1):
        best = y[: n - patience].min()
        if np.all(y[n - patience : n] > best + min_delta * se[n - patience : n]):
            return n - 1
    return None


def curves(seed: int, model: str, noise: float, family: str, n: int) -> list[dict]:
    rng = np.random.default_rng(
        [seed, MODELS.index(model), NOISES.index(noise), FAMILIES.index(family)]
    )
    return [make_curve(family, noise, model, rng) for _ in range(n)]


def score(found: list[int | None], batch: list[dict], family: str) -> dict:
    if family in FLAT:
        return {"false_alarm": float(np.mean([f is not None for f in found]))}
    delays = [f - c["bottom"] for f, c in zip(found, batch) if f is not None and f > c["bottom"]]
    early = sum(f is not None and f <= c["bottom"] for f, c in zip(found, batch))
    return {
        "hits": len(delays) / len(batch),
        "early": early / len(batch),
        "median_delay": float(np.median(delays)) if delays else math.nan,
    }


def tune_baseline(n: int) -> tuple[int, float]:
    """The (patience, min_delta) with the most hits among those within the false-alarm budget."""
    best = None
    pool = {
        (m, z, f): curves(s, m, z, f, n)
        for s in TUNING_SEEDS
        for m in MODELS
        for z in NOISES
        for f in FAMILIES
    }
    for patience, delta in BASELINE_GRID:
        alarms = [
            baseline_crossing(c, patience, delta) is not None
            for (_, _, f), batch in pool.items()
            if f in FLAT
            for c in batch
        ]
        if np.mean(alarms) > BUDGET:
            continue
        u = [
            score([baseline_crossing(c, patience, delta) for c in batch], batch, f)["hits"]
            for (_, _, f), batch in pool.items()
            if f == "u_shape"
        ]
        if best is None or np.mean(u) > best[0]:
            best = (float(np.mean(u)), patience, float(delta))
    assert best is not None
    return best[1], best[2]


def run(n: int) -> dict:
    start = time.process_time()
    config = DetectorConfig()
    patience, delta = tune_baseline(max(n // 4, 20))
    rows = []
    for model in MODELS:
        for noise in NOISES:
            for family in FAMILIES:
                per_seed: dict[str, list] = {}
                for seed in REPORT_SEEDS:
                    batch = curves(seed, model, noise, family, n)
                    found = [first_crossing(c, config) for c in batch]
                    for key, v in score(found, batch, family).items():
                        per_seed.setdefault(key, []).append(v)
                    if model == "crn":  # the same curves judged without their samples
                        bare = [{**c, "samples": [None] * N_POINTS} for c in batch]
                        found = [first_crossing(c, config) for c in bare]
                        for key, v in score(found, batch, family).items():
                            per_seed.setdefault("unpaired_" + key, []).append(v)
                    base = [baseline_crossing(c, patience, delta) for c in batch]
                    for key, v in score(base, batch, family).items():
                        per_seed.setdefault("baseline_" + key, []).append(v)
                rows.append({"model": model, "noise": noise, "family": family, **per_seed})
    return {
        "rows": rows,
        "config": config.to_dict(),
        "baseline": {"patience": patience, "min_delta_stderrs": delta},
        "curves_per_cell_and_seed": n,
        "report_seeds": list(REPORT_SEEDS),
        "tuning_seeds": list(TUNING_SEEDS),
        "cpu_seconds": round(time.process_time() - start, 1),
    }


def _range(values: list[float], pct: bool = True) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:g}")
    pooled = float(np.mean(values))
    return f"{f(pooled)} ({f(min(values))}-{f(max(values))})"


def markdown(result: dict) -> str:
    b = result["baseline"]
    lines = [
        "# Inflection detector validation",
        "",
        f"Detector defaults: {result['config']}. Baseline (EarlyStopping-style, tuned on"
        f" seeds {result['tuning_seeds']} to <= 1% false alarms): patience {b['patience']},"
        f" min_delta {b['min_delta_stderrs']:g} stderrs. {result['curves_per_cell_and_seed']}"
        f" curves per cell and seed, seeds {result['report_seeds']}; each cell: the mean over"
        " seeds (the range over seeds). Produced by `python benchmarks/detector_validation.py`"
        f" in {result['cpu_seconds']} CPU-seconds. Definitions: the script's docstring.",
        "",
        "| noise model | noise (of depth) | family | false alarms | hits | early | median delay"
        " | without samples: false alarms | without samples: hits | without samples: delay"
        " | baseline: false alarms | baseline: hits | baseline: delay |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cells = [
            r["model"],
            f"{100 * r['noise']:g}%",
            r["family"],
            _range(r.get("false_alarm", [])),
            _range(r.get("hits", [])),
            _range(r.get("early", [])),
            _range(r.get("median_delay", []), pct=False),
            _range(r.get("unpaired_false_alarm", [])),
            _range(r.get("unpaired_hits", [])),
            _range(r.get("unpaired_median_delay", []), pct=False),
            _range(r.get("baseline_false_alarm", [])),
            _range(r.get("baseline_hits", [])),
            _range(r.get("baseline_median_delay", []), pct=False),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The forecast is validated in `forecast_validation.md` (same curves and more)."]
    return "\n".join(lines) + "\n"


def tune(n: int) -> None:
    """Print false alarms, hits and delays on the tuning seeds over a grid of settings."""
    pool = {
        (m, z, f): [c for s in TUNING_SEEDS for c in curves(s, m, z, f, n)]
        for m in MODELS[:1]
        for z in NOISES
        for f in FAMILIES
    }
    for patience in (2,):
        for sigmas in (2.5, 3.0):
            config = DetectorConfig(patience=patience, noise_sigmas=sigmas)
            out = {}
            for (_, _, f), batch in pool.items():
                for key, v in score([first_crossing(c, config) for c in batch], batch, f).items():
                    out.setdefault(key, []).append(v)
            print(
                patience,
                sigmas,
                {k: round(float(np.nanmean(v)), 3) for k, v in out.items()},
                {k: [round(x, 3) for x in v] for k, v in out.items()},
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--curves", type=int, default=100, help="curves per cell and seed")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--tune", action="store_true", help="grid on the tuning seeds")
    args = parser.parse_args()
    if args.tune:
        tune(args.curves)
        return
    result = run(args.curves)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "detector_validation.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(args.out, "detector_validation.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
